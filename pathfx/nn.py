"""Module types of pathfx's rewrites: the runtime modules of a path-reparameterized network
(``PathLayer``, ``PBN``, DESIGN §3) and the layer and BatchNorm types the compiler folds and rescales.

They live with the compiler that builds and reads them (``passes``); this is their public name.
"""
from passes.fold_bn import BATCHNORMS, LAYERS
from passes.pathnn import PBN, PathLayer

__all__ = ["PathLayer", "PBN", "LAYERS", "BATCHNORMS"]
