"""Which balanced variables carry signal from the input to the output through nonzero weights.

ENorm's objective has a minimum along a set of variables only when the set is fed from outside
it and feeds something outside it. Channels that feed only layers writing back into the same
channels (and are then sliced away), or whose every incoming weight is zero, can be scaled
toward 0 or ∞ while the objective keeps falling: ENorm would never converge and the result
would depend on where it started. Such variables are dead: they keep factor 1.

The test is reachability on a directed graph: node SOURCE (every row or column that is not a
balanced variable, on the input side), node SINK (the same on the output side), one node per
variable, and an edge column-variable → row-variable for every nonzero entry of a weight.
A fully nonzero block of a weight (the usual case) is represented by a hub node that all of its
columns feed and that feeds all of its rows, so a dense layer costs rows + columns edges,
not rows × columns. A variable is live when SOURCE reaches it and it reaches SINK; along any
SOURCE → SINK path the log-factors of a descent direction must be non-increasing from 0 to 0,
so the objective is coercive in the live variables and ENorm converges on them.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order

SOURCE, SINK = 0, 1


def positive_blocks(E, blocks: int) -> np.ndarray:
    """Per block of a weight: are all of its entries nonzero? ``E`` is a tensor (blocks, rows, cols)
    positive exactly where the weight's kernel is nonzero, or a lazy weight (``all_nonzero``,
    ``nonzero_blocks``: enorm_numbers.LazySquares, LazyLogs)."""
    if hasattr(E, "all_nonzero"):
        return np.array([E.all_nonzero()])
    return (E.reshape(blocks, -1).amin(1) > 0).numpy()


def _nonzero_pairs(E, blocks: int, rows: int, cols: int, which: np.ndarray):
    """(column index, row index) in flat block-major numbering for the nonzero entries of the
    blocks ``which`` (weights of several blocks are small: grouped and depthwise convs)."""
    idx = torch.as_tensor(which, dtype=torch.long)
    nz = torch.nonzero(E.reshape(blocks, rows, cols)[idx] > 0).numpy()
    b = which[nz[:, 0]]
    return b * cols + nz[:, 2], b * rows + nz[:, 1]


def _aggregate(E, rnode: np.ndarray, cnode: np.ndarray, hub: int):
    """Edges of a one-block weight with zero entries, by node, without listing its entries: count
    the nonzero entries between each row node and each column node, then join every column node
    that has any to a hub that feeds the row nodes joined to all of them, and give only the other
    row nodes (a few, when zeros are scattered: random weights hold exact zeros) explicit edges."""
    ucol, cl = np.unique(cnode, return_inverse=True)
    urow, rl = np.unique(rnode, return_inverse=True)
    cl, rl = torch.as_tensor(cl.ravel()), torch.as_tensor(rl.ravel())
    chunks = E.nonzero_blocks() if hasattr(E, "nonzero_blocks") else [(0, E.reshape(E.shape[-2], E.shape[-1]))]
    A = torch.zeros(len(urow), len(ucol))
    for start, e in chunks:
        T = torch.zeros(len(e), len(ucol)).index_add_(1, cl, (e > 0).float())
        A.index_add_(0, rl[start:start + len(e)], T)
    Z = (A > 0).numpy()
    used = Z.any(0)
    whole = Z[:, used].all(1) & used.any()
    i, j = np.nonzero(Z[~whole])
    rest = urow[~whole]
    return ([ucol[used], np.full(int(whole.sum()), hub), ucol[j]],
            [np.full(int(used.sum()), hub), urow[whole], rest[i]])


def edges(E, blocks: int, rows: int, cols: int, rvar: np.ndarray, cvar: np.ndarray, hub: int,
          full: np.ndarray):
    """Edges (src, dst) of one weight; ``rvar`` / ``cvar`` give the global variable of each row /
    column (-1: not a balanced variable); hub nodes are numbered from ``hub``, one per block."""
    rnode = np.where(rvar >= 0, rvar + 2, SINK)
    cnode = np.where(cvar >= 0, cvar + 2, SOURCE)
    src, dst = [], []
    fb = np.flatnonzero(full)
    if len(fb):
        h = hub + fb
        src += [cnode.reshape(blocks, cols)[fb].ravel(), np.repeat(h, rows)]
        dst += [np.repeat(h, cols), rnode.reshape(blocks, rows)[fb].ravel()]
    pb = np.flatnonzero(~full)
    if len(pb) and blocks == 1:
        s, d = _aggregate(E, rnode, cnode, hub)
        src += s
        dst += d
    elif len(pb):
        c, r = _nonzero_pairs(E, blocks, rows, cols, pb)
        src.append(cnode[c]), dst.append(rnode[r])
    return src, dst


def live(n_vars: int, weights: list, rvars: list, cvars: list, energies: list, fulls: list) -> np.ndarray:
    """Boolean per global variable: reached from SOURCE and reaching SINK through nonzero weights.

    ``weights`` are (blocks, rows, cols) per weight; ``fulls`` the per-block "all nonzero" flags
    (``energies`` are read only for blocks that are not all nonzero)."""
    src, dst, hub = [], [], n_vars + 2
    for (blocks, rows, cols), rv, cv, E, full in zip(weights, rvars, cvars, energies, fulls):
        s, d = edges(E, blocks, rows, cols, rv, cv, hub, full)
        src += s
        dst += d
        hub += blocks
    src = np.concatenate(src) if src else np.zeros(0, dtype=np.int64)
    dst = np.concatenate(dst) if dst else np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(hub, hub)).tocsr()
    seen = np.zeros((2, hub), dtype=bool)
    seen[0, breadth_first_order(graph, SOURCE, directed=True, return_predecessors=False)] = True
    seen[1, breadth_first_order(graph.T.tocsr(), SINK, directed=True, return_predecessors=False)] = True
    return (seen[0] & seen[1])[2:n_vars + 2]
