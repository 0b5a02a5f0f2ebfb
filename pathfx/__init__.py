"""pathfx: rescaling-group discovery, Equi-normalization and path reparameterization over torch.fx."""
from zoo._torchvision import torchvision as _torchvision

_torchvision()  # so that a plain `import torchvision` after `import pathfx` works on CPU-only torch

from passes.errors import (InputError, NonFiniteError, PathfxError, ShapeError, TraceError,  # noqa: E402
                           VerificationError)
from passes.groupset import RescalingGroups  # noqa: E402
from passes.onnx_export import ExportReport, export_onnx, onnx_op_counts  # noqa: E402
from passes.pathnorm import path_norm  # noqa: E402
from passes.quantize import Int8Error, QuantizationReport  # noqa: E402
from passes.trace import trace  # noqa: E402
from passes.verify import Verification, verify  # noqa: E402

from . import optim  # noqa: E402
from .analysis import find_groups  # noqa: E402
from .balance import enorm  # noqa: E402
from .plan import Plan, PlanMismatchError  # noqa: E402
from .reparam import ReparamReport, reparameterize  # noqa: E402
from .transform import TransformResult, transform  # noqa: E402

__all__ = ["find_groups", "RescalingGroups", "enorm", "optim", "reparameterize", "ReparamReport", "transform",
           "TransformResult", "Plan", "PlanMismatchError", "verify", "Verification", "export_onnx", "ExportReport",
           "QuantizationReport", "Int8Error", "onnx_op_counts", "path_norm", "trace", "PathfxError", "TraceError",
           "ShapeError", "InputError", "NonFiniteError", "VerificationError"]
