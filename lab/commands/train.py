"""`pathfx train --model M --plan P`: train a model with one of the lab's methods; a CSV log and a PNG of the curves."""
from __future__ import annotations

import io
import os

from pathfx import InputError
from pathfx.commands import write_atomic

from ..data import DATASETS, load
from ..plots import curves
from ..train import COLUMNS, CPU_WIDTH_DIVISOR, METHODS, default_width, search_lr, train

NAME = "train"
HELP = ("train a model with plain SGD, sgd (+BN), enorm, gsgd (+P-BN) or gsgd-bn on digits, MNIST-1D, synthetic "
        "data or CIFAR-10")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="zoo or torchvision model name, e.g. plainnet18")
    p.add_argument("--plan", required=True, choices=METHODS,
                   help="plain: SGD without normalisation (the ENorm paper's Baseline); sgd: SGD + BN; enorm: "
                        "balanced, ENorm after each step; gsgd: G-SGD + P-BN; gsgd-bn: G-SGD with conventional BN")
    p.add_argument("--lr-search", action="store_true",
                   help="train once per learning rate of the plan's grid on 80%% of the training data, keep the "
                        "lr with the lowest error on the other 20%% (never the test set), report that run")
    p.add_argument("--data", default="digits",
                   help="digits (default), mnist1d (the mnist1d_* models), synthetic or cifar10 (needs --cifar-dir)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, help="default: the plan's")
    p.add_argument("--lr", type=float, help="default: the plan's")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and augmentation")
    p.add_argument("--width", type=int, help=f"width argument of the zoo builder (default: its own width / "
                                              f"{CPU_WIDTH_DIVISOR}; pass the full width explicitly)")
    p.add_argument("--csv", metavar="FILE", help="write the per-epoch log as CSV")
    p.add_argument("--png", metavar="FILE", help="write loss and accuracy curves as PNG")
    p.add_argument("--cifar-dir", metavar="DIR", help="directory of the CIFAR-10 python batches (never downloaded)")
    p.add_argument("--force", action="store_true", help="overwrite --csv / --png files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    for path in (args.csv, args.png):  # refuse before any work, not after minutes of it
        if path and os.path.exists(path) and not args.force:
            raise InputError(f"output file '{path}' exists (use --force to overwrite)")
    if args.data not in DATASETS:
        raise InputError(f"unknown dataset '{args.data}': {', '.join(DATASETS)}")
    if args.data == "cifar10" and not args.cifar_dir:
        raise InputError("--data cifar10 needs --cifar-dir DIR (the directory of the CIFAR-10 python batches; "
                         "nothing is downloaded)")
    width = args.width if args.width is not None else default_width(args.model)
    widths = [5, 10, 9, 9, 8, 8, 8]

    def log(row):
        cells = [str(row["epoch"])] + [f"{row[c]:.4f}" for c in COLUMNS[1:5]] + [f"{row['seconds']:.1f}",
                                                                                 f"{row['lr']:.3g}"]
        _print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))

    print(f"train {args.model} (width {width if width is not None else 'default'}) with {args.plan} on {args.data}, "
          f"{args.epochs} epochs, seed {args.seed}")
    if args.lr_search:
        if args.lr is not None:
            raise InputError("--lr-search chooses the learning rate: give --lr or --lr-search, not both")
        import zoo

        data = load(args.data, shape=tuple(zoo.lookup(args.model).input_shape[1:]), root=args.cifar_dir,
                    seed=args.seed)
        found = search_lr(args.model, args.plan, data, args.epochs, seed=args.seed, width=width,
                          batch_size=args.batch_size, cifar_dir=args.cifar_dir,
                          log=lambda lr, err: _print(f"  lr {lr:g}: validation error "
                                                     f"{'diverged' if err is None else f'{100 * err:.2f}%'}"))
        print(f"learning rate {found.lr:g}, chosen on a validation split of {found.validation_size} training "
              f"examples from {', '.join(f'{lr:g}' for lr in found.grid)}")
        r = found.result
    else:
        _print("  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths)))
        r = train(args.model, args.plan, args.data, args.epochs, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed, width=width, progress=not args.no_progress, log=log, cifar_dir=args.cifar_dir)
    s = r.settings
    print(f"\n{r.steps} steps of batch {s['batch_size']}, lr {s['lr']:g} ({s['schedule']}), "
          f"{r.seconds_per_step:.3f} s per step")
    if r.test_error is not None:
        print(f"final test error {100 * r.test_error:.2f}% (test loss {r.rows[-1]['test_loss']:.4f})")
    if args.csv:
        write_atomic(args.csv, r.to_csv(), force=args.force)
        print(f"log written to {args.csv}")
    if args.png:
        buf = io.BytesIO()
        curves({f"{args.model} {args.plan}": r}, buf)
        write_atomic(args.png, buf.getvalue(), force=args.force, binary=True)
        print(f"curves written to {args.png}")
    if r.stopped:
        print(f"stopped: {r.stopped}")
        return 1
    return 0


def _print(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)  # keeps the progress bar below the table
