"""What several subcommands share: naming a model and building its example input."""
from __future__ import annotations

import os
import tempfile

import torch

from passes.errors import InputError


def add_model_arguments(p) -> None:
    p.add_argument("model", help="torchvision classification model name, zoo name, or package.module:factory")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the example input")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise InputError(f"input shape '{text}' does not parse: expected integers like 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"input shape '{text}' must be positive integers like 1,3,224,224")
    return shape


def load_model(args):
    """(model, example input, name) for a CLI model argument."""
    import zoo

    entry = zoo.lookup(args.model)
    torch.manual_seed(args.seed)
    model = zoo.build(args.model)
    shape = parse_shape(args.input_shape) if args.input_shape else entry.input_shape
    if shape is None:
        raise InputError(f"model '{args.model}' has no default input shape: pass --input-shape")
    return model, torch.randn(*shape), entry.name


def write_atomic(path: str, data, force: bool = False, binary: bool = False) -> None:
    """Write to a temporary file in the target directory, then rename; refuse to overwrite without force."""
    if os.path.exists(path) and not force:
        raise InputError(f"output file '{path}' exists (use --force to overwrite)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"cannot write '{path}': directory '{directory}' does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pathfx-", suffix=".tmp")
    except OSError as e:
        raise InputError(f"cannot write '{path}': {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
