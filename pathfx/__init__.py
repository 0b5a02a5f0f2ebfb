"""pathfx: rescaling-group discovery, Equi-normalization and path reparameterization over torch.fx."""
from passes.errors import PathfxError, ShapeError, TraceError
from passes.groupset import RescalingGroups

from .analysis import find_groups

__all__ = ["find_groups", "RescalingGroups", "PathfxError", "TraceError", "ShapeError"]
