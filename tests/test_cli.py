"""The CLI: readable output, and one clear line with exit code 2 for every error the user can cause."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pathfx.cli import main

HERE = os.path.dirname(__file__)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_groups_table_and_check(capsys):
    code, out, err = run(capsys, "groups", "cli_models:mlp", "--check")
    assert code == 0
    assert "2 groups, 9 free variables" in out and "soundness" in out and "(ok)" in out


def test_groups_json_round_trips(capsys):
    from passes.groupset import RescalingGroups

    code, out, _ = run(capsys, "groups", "cli_models:mlp", "--json")
    assert code == 0
    g = RescalingGroups.from_json(out)
    assert g.num_free == 9 and json.loads(out)["num_free"] == 9


def test_dot_file_written_and_not_overwritten(capsys, tmp_path):
    dot = tmp_path / "g.dot"
    assert run(capsys, "groups", "cli_models:mlp", "--dot", str(dot))[0] == 0
    assert dot.read_text().lstrip().startswith(("digraph", "strict digraph"))
    code, _, err = run(capsys, "groups", "cli_models:mlp", "--dot", str(dot))
    assert code == 2 and "exists" in err and "--force" in err
    assert run(capsys, "groups", "cli_models:mlp", "--dot", str(dot), "--force")[0] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["g.dot"]  # no temporary file left behind


@pytest.mark.parametrize("argv, words", [
    (["groups", "resnt18"], ["unknown model 'resnt18'", "resnet18"]),
    (["groups", "resnet18", "--input-shape", "1,3,x"], ["does not parse"]),
    (["groups", "resnet18", "--input-shape", "1,4,64,64"], ["conv1", "channels"]),
    (["groups", "no_such_pkg.models:build"], ["cannot import 'no_such_pkg.models'"]),
    (["groups", "no/such/models.py:build"], ["cannot import 'no/such/models.py'", "no file"]),
    (["groups", "cli_models:nothing"], ["no callable 'nothing'"]),
    (["groups", "cli_models:untraceable", "--input-shape", "1,3,8,8", "--no-auto-leaves"],
     ["gate", "leaf_modules", "cli_models.py"]),
    (["groups", "cli_models:mlp", "--dot", "/no/such/dir/g.dot"], ["does not exist"]),
])
def test_user_errors_exit_2_with_one_line(capsys, argv, words):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err and err.startswith("pathfx: error: ")
    for w in words:
        assert w in err, err


def test_model_from_a_source_file(capsys):
    path = os.path.join(HERE, "cli_models.py")
    code, out, _ = run(capsys, "groups", f"{path}:mlp")
    assert code == 0 and out.startswith(f"{path}:mlp: 2 groups"), out


@pytest.mark.parametrize("flags, reason", [
    ([], "could not be traced: symbolically traced variables cannot be used as inputs to control flow"),
    (["--leaf", "gate", "--no-auto-leaves"], "kept opaque by leaf_modules"),
])
def test_untraceable_submodule_is_an_opaque_leaf(capsys, flags, reason):
    code, out, _ = run(capsys, "groups", "cli_models:untraceable", "--input-shape", "1,3,8,8", *flags)
    assert code == 0
    row = next(line for line in out.splitlines() if f"input of Gate (opaque leaf: {reason}" in line)
    assert row.split()[:2] == ["8", "1"] and row.rstrip().endswith("gate")
    assert "0 groups, 0 free variables, 10 frozen, 1 barriers" in out
    leaf = next(line for line in out.splitlines() if line.startswith("gate "))
    assert leaf.split()[:2] == ["gate", "Gate"] and leaf.rstrip().endswith(reason)


def test_console_script_end_to_end():
    env = dict(os.environ, PYTHONPATH=HERE)
    exe = os.path.join(os.path.dirname(sys.executable), "pathfx")
    bad = subprocess.run([exe, "groups", "resnt18"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    good = subprocess.run([exe, "groups", "cli_models:mlp"], capture_output=True, text=True, env=env)
    assert good.returncode == 0 and "free variables" in good.stdout
