"""`pathfx experiments` at tiny size: the report's sections and tables, valid figures, a diverged run reported,
and no overwrite without --force."""
import pytest
from PIL import Image

import lab.experiments as experiments
from passes.errors import InputError
from pathfx.cli import main
from lab.experiments import Config

TINY = Config(models=("plainnet18",), methods=("sgd", "gsgd"), seeds=(0, 1), epochs=1, max_steps=2,
              observe_depth=4, observe_width=8, observe_batch=16, annex_layers=12, annex_width=8)


def fake_divergence(monkeypatch):
    """gsgd at seed 1 reports a non-finite loss, as the harness does when training diverges."""
    real = experiments.train

    def train(name, method, data, epochs, seed=0, **kw):
        r = real(name, method, data, epochs, seed=seed, **kw)
        if method == "gsgd" and seed == 1:
            r.stopped = "loss is nan at epoch 1, step 2 (lr 0.1): training diverged; try a smaller --lr"
        return r

    monkeypatch.setattr(experiments, "train", train)


def test_tiny_report_has_tables_figures_and_stopped_runs(tmp_path, monkeypatch):
    fake_divergence(monkeypatch)
    out = tmp_path / "exp.md"
    report = experiments.run(TINY, str(out), command="pathfx experiments --tiny", log=lambda line: None)
    text = out.read_text()
    for needle in ("`pathfx experiments --tiny`", "| seeds | 0, 1 |", "total wall time", "logical cores",
                   "## 1. Training methods", "| model | method | paper's name | test error % (mean ± std)",
                   "### Learning rates chosen on validation", "| plainnet18 | `gsgd` | ", "0.5: ",
                   "| claim | source | measured (mean test error, or as stated) | verdict |",
                   "| model | width | input | method | batch | lr |", "## 2. BN vs P-BN",
                   "| layer | BN σ | P-BN σ |", "## 3. ENorm re-balancing", "| layer 6 (× 1.2) energy |",
                   "## 4. What reproduces and what does not", "pbn F.4", "enorm Annex A"):
        assert needle in text, needle
    assert "| plainnet18 | `sgd` | SGD+BN |" in text
    gsgd_row = next(line for line in text.splitlines() if line.startswith("| plainnet18 | `gsgd` |"))
    assert "(1 of 2 runs)" in gsgd_row and "stopped" in gsgd_row
    assert "- plainnet18 `gsgd` seed 1: loss is nan" in text
    assert "3 of 4 training runs finished; 1 stopped" in text
    assert report.models[0].error("gsgd")[1] is None  # the mean and std leave the diverged run out
    figures = sorted((tmp_path / "exp").iterdir())
    assert [f.name for f in figures] == ["enorm_annex_a.png", "observe.csv", "observe.png", "plainnet18.png"]
    for f in figures:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(f) as im:
                im.verify()
            assert f"](exp/{f.name})" in text  # linked relative to the markdown


def test_existing_report_is_kept_without_force(tmp_path, capsys):
    out = tmp_path / "exp.md"
    out.write_text("kept")
    with pytest.raises(InputError, match="exists"):
        experiments.run(TINY, str(out), log=lambda line: None)
    assert main(["experiments", "--out", str(out), "--models", "plainnet18", "--epochs", "1"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "kept"


@pytest.mark.parametrize("argv, message", [
    (["--models", "plainnet81"], "unknown model"),
    (["--methods", "adam"], "unknown method"),
    (["--seeds", "a,b"], "does not parse"),
    (["--out", "report.txt"], "does not end in .md"),
])
def test_bad_options_fail_before_any_run(tmp_path, capsys, argv, message):
    assert main(["experiments", "--out", str(tmp_path / "exp.md")] + argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "exp.md").exists()


def test_quick_profile_and_explicit_options(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(experiments, "run", lambda cfg, out, **kw: seen.append(cfg))
    assert main(["experiments", "--quick", "--out", str(tmp_path / "q.md")]) == 0
    assert main(["experiments", "--quick", "--seeds", "3", "--out", str(tmp_path / "q.md")]) == 0
    quick, seeded = seen
    assert quick == Config.quick() and quick.models == Config().models and quick.epochs < Config().epochs
    assert seeded.seeds == (3,) and seeded.epochs == quick.epochs
