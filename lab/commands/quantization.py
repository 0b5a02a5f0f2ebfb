"""`pathfx quantization`: per-tensor int8 accuracy of models trained on digits, as trained and balanced."""
from __future__ import annotations

from . import command_line, names, seeds

NAME = "quantization"
HELP = ("train the study's models on digits over several seeds and measure per-tensor int8 accuracy as trained, "
        "after torch.ao cross-layer equalization and after pathfx ENorm (p = 2, p = ∞), with per-channel int8 as "
        "the reference; writes docs/quantization.md and its PNG")

# A run of seconds for the tests: one narrow model, one seed, two optimizer steps.
QUICK = dict(models=("vgg11_bn_small",), seeds=(0,), epochs=1, max_steps=2, calibration=50,
             build={"vgg11_bn_small": {"width": 4}})


def add_arguments(p) -> None:
    from ..quantization import Config

    c = Config()
    p.add_argument("--out", default="docs/quantization.md", help="the report (default docs/quantization.md); the "
                                                                 "figure is written beside it, same name, .png")
    p.add_argument("--models", default=",".join(c.models), help=f"comma-separated (default {','.join(c.models)})")
    p.add_argument("--seeds", default=",".join(map(str, c.seeds)), help="comma-separated (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=c.epochs, help=f"training epochs per run (default {c.epochs})")
    p.add_argument("--calibration", type=int, default=c.calibration,
                   help=f"training images for the int8 calibration, a multiple of {c.batch} (default {c.calibration})")
    p.add_argument("--threads", type=int, default=c.threads, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="a check of the whole study in seconds: one narrow VGG, "
                                                        "one seed, two training steps (overrides the options above)")
    p.add_argument("--force", action="store_true", help="overwrite the report and its figure")


def run(args) -> int:
    from ..quantization import Config, run as run_study

    cfg = Config(**QUICK, threads=args.threads) if args.quick else \
        Config(models=names(args.models), seeds=seeds(args.seeds), epochs=args.epochs, calibration=args.calibration,
               threads=args.threads)
    run_study(cfg, args.out, force=args.force, command=command_line(args, "pathfx quantization"),
              log=lambda line: print(line, flush=True))
    return 0
