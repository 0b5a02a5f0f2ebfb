"""BN → P-BN rewrite (pbn eq. 3–5, DESIGN §3).

A path layer that carries red weights and the BatchNorm right after it become one
``passes.pathnn.PBN``: z = BN(offdiag(x)) + λ·red(x); the activation that followed the BN now
follows the P-BN, so inside a torchvision BasicBlock/Bottleneck the residual add and ReLU
see z exactly where they saw BN(conv(x)). Only such pairs are rewritten: a layer whose
input is not a reparameterized variable (the first layer, a block's first conv under
"per-block") has no red weights and keeps ordinary BN, as does a BN that does not directly
follow a layer.
"""
from __future__ import annotations

import torch.fx as fx

from .pathnn import PBN


def insert_pbn(gm: fx.GraphModule, paths: dict, bn_after: dict[str, str], lam: float = 1.0,
               red_scale: dict | None = None) -> list[tuple[str, str]]:
    """In place: fuse each (path layer with red weights, its BN) into a P-BN; returns the fused (layer, bn)
    pairs. ``red_scale``: per layer, the scale of its red term (passes.pathnn.PBN)."""
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    modules = dict(gm.named_modules())
    fused = []
    for name, layer in paths.items():
        if not layer.has_red or name not in bn_after:
            continue
        bn_name = bn_after[name]
        nodes[bn_name].replace_all_uses_with(nodes[name])
        gm.graph.erase_node(nodes[bn_name])
        gm.set_submodule(name, PBN(layer, modules[bn_name], lam=lam, red_scale=(red_scale or {}).get(name)))
        fused.append((name, bn_name))
    gm.graph.lint()
    gm.recompile()
    return fused
