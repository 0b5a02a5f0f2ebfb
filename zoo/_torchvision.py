"""The one place the project imports torchvision.

The CPU torch wheel cannot load torchvision's compiled extension; its import then
fails while registering fake kernels for ``torchvision::nms`` / ``qnms``. The
classification models are pure Python, so defining those two schemas first is
enough for ``torchvision.models`` to work.
"""
import importlib

import torch

_LIB = None


def _define_missing_ops():
    global _LIB
    if hasattr(torch.ops.torchvision, "nms"):
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - triggers the lookup
        return
    except (AttributeError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def torchvision():
    """Return the imported torchvision package, installing the shim when needed."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError:
        import sys

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _define_missing_ops()
        return importlib.import_module("torchvision")
