"""The one-way layers (README, "Layout"): lab above pathfx above zoo above passes, checked by the
import-linter contracts of pyproject.toml."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")
PACKAGES = ("lab", "pathfx", "zoo", "passes")


def lint(root: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_layer_contracts_hold():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_a_back_import_breaks_the_contracts(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(ROOT, pkg), tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    with open(tmp_path / "passes" / "table.py", "a") as f:
        f.write("\nimport pathfx  # the compiler reaching up into its API\n")
    with open(tmp_path / "lab" / "data.py", "a") as f:
        f.write("\nfrom passes import groups  # the lab going around the public API\n")
    r = lint(str(tmp_path))
    assert r.returncode != 0
    assert "passes is not allowed to import pathfx" in r.stdout
    assert "lab.data -> passes.groups" in r.stdout


def test_import_pathfx_loads_no_lab_module():
    code = ("import sys, pathfx, pathfx.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lab', 'matplotlib', 'sklearn', 'mnist1d'}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
