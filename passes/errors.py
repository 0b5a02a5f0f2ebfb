"""Errors a user can cause. Each carries one readable message; the CLI prints it and exits 2."""


class PathfxError(Exception):
    """Base class of the errors pathfx raises on purpose."""


class TraceError(PathfxError):
    """symbolic_trace could not trace the model."""


class GraphMismatch(TraceError):
    """The traced graph does not compute what the model's forward computes on the example input."""


class ShapeError(PathfxError):
    """The model's forward failed on the example inputs."""


class NonFiniteError(PathfxError):
    """A parameter holds NaN or Inf."""


class ModelNotFound(PathfxError):
    """A model name that no registry knows."""


class InputError(PathfxError):
    """A bad argument: an input shape that does not parse, a missing example input..."""


class VerificationError(PathfxError):
    """Two models (or a model and its ONNX export) compute different functions beyond tolerance."""
