"""Model names: torchvision's classification models, the zoo's own builders, ``timm:NAME``,
``package.module:factory``."""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from passes.errors import ModelNotFound

from . import timm, typec
from ._torchvision import torchvision


@dataclass
class Entry:
    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple
    source: str  # "torchvision" | "zoo" | "timm" | "factory"


ZOO: dict[str, Entry] = {}


def register(name: str, input_shape: tuple):
    def wrap(fn):
        ZOO[name] = Entry(name, fn, input_shape, "zoo")
        return fn
    return wrap


register("resnet18_typec", (1, 3, 32, 32))(typec.resnet18_typec)

# Models whose default input is not 224×224.
_TV_SHAPES = {"inception_v3": (1, 3, 299, 299)}


def torchvision_names() -> list[str]:
    tv = torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def all_names() -> list[str]:
    return torchvision_names() + sorted(ZOO)


def lookup(name: str) -> Entry:
    """The registry entry of a model name; unknown names raise with the closest matches."""
    if name.startswith("zoo:"):
        name = name[4:]
    if name in ZOO:
        return ZOO[name]
    if name.startswith(timm.PREFIX):
        bare = name[len(timm.PREFIX):]
        return Entry(name, timm.builder(bare), timm.input_shape(bare), "timm")
    if ":" in name:
        return _factory(name)
    names = torchvision_names()
    if name in names:
        tv = torchvision()
        build = lambda **kw: tv.models.get_model(name, weights=None, **kw)  # noqa: E731
        return Entry(name, build, _TV_SHAPES.get(name, (1, 3, 224, 224)), "torchvision")
    close = difflib.get_close_matches(name, names + sorted(ZOO), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ModelNotFound(f"unknown model '{name}'{hint} (see `pathfx zoo --list`; timm's models are timm:NAME)")


def _factory(spec: str) -> Entry:
    mod_name, _, attr = spec.rpartition(":")
    try:
        mod = _load_file(mod_name) if mod_name.endswith(".py") else importlib.import_module(mod_name)
    except Exception as e:
        raise ModelNotFound(f"cannot import '{mod_name}' for model '{spec}': {type(e).__name__}: {e}") from None
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise ModelNotFound(f"'{mod_name}' has no callable '{attr}' (model '{spec}')")
    return Entry(spec, fn, getattr(fn, "input_shape", None), "factory")


def _load_file(path: str):
    """A module from a source file, so ``path/to/models.py:build`` works as ``models:build`` does."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file '{path}'")
    name = "pathfx_user_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def build(name: str, **kw) -> nn.Module:
    entry = lookup(name)
    try:
        model = entry.build(**kw)
    except Exception as e:
        raise ModelNotFound(f"building '{name}' failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelNotFound(f"'{name}' returned {type(model).__name__}, not an nn.Module")
    return model


def default_input_shape(model: nn.Module) -> tuple | None:
    """The default example-input shape of a model instance built by torchvision or the zoo, else None."""
    cls = type(model)
    if cls.__module__.startswith("timm.models") and hasattr(model, "pretrained_cfg"):
        return (1,) + tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    if cls.__module__.startswith("torchvision.models"):
        return _TV_SHAPES["inception_v3"] if cls.__name__ == "Inception3" else (1, 3, 224, 224)
    for entry in ZOO.values():
        ret = getattr(entry.build, "__annotations__", {}).get("return")
        if ret is not None and (ret if isinstance(ret, str) else ret.__name__) == cls.__name__:
            return entry.input_shape
    return None
