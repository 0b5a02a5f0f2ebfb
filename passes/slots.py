"""Abstract values of the group analysis.

A tensor's abstract value is an integer array of *slot ids* broadcastable to the
tensor's shape (same number of dims, each dim either 1 or the tensor's size): element
[i, j, ...] of the tensor is scaled by the factor of slot ``ids[i, j, ...]`` (broadcast).
Slot 0 is FIXED (factor 1). A conv output has ids of shape (1, C, 1, 1); a flatten of it,
(1, C·H·W) with each channel repeated H·W times. Unions between slots are recorded as
edges and resolved at the end with connected components.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIXED = 0


class NonTensor:
    """A Python value (a size, a dtype) that carries no slots."""

    def __repr__(self):
        return "NON_TENSOR"


NON_TENSOR = NonTensor()


def fixed(ndim: int) -> np.ndarray:
    return np.zeros((1,) * ndim, dtype=np.int64)


def is_free(ids) -> bool:
    return isinstance(ids, np.ndarray) and bool(ids.any())


def compress(ids: np.ndarray) -> np.ndarray:
    """Reduce every dim along which ids do not vary to size 1."""
    for d in range(ids.ndim):
        if ids.shape[d] > 1:
            first = np.take(ids, [0], axis=d)
            if (ids == first).all():
                ids = first
    return ids


def only_along(ids: np.ndarray, dim: int) -> bool:
    """True when ids vary at most along ``dim``."""
    return all(s == 1 for d, s in enumerate(ids.shape) if d != dim % ids.ndim)


def along(ids: np.ndarray, dim: int, size: int) -> np.ndarray:
    """The 1-D slot vector along ``dim`` (requires ``only_along``)."""
    return np.broadcast_to(ids.reshape(-1), (size,)) if ids.size == 1 else ids.reshape(-1)


def channel_ids(vec: np.ndarray, ndim: int, dim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[dim % ndim] = len(vec)
    return np.asarray(vec, dtype=np.int64).reshape(shape)


def distinct(ids) -> np.ndarray:
    """The sorted distinct values of an integer array (np.unique, by sorting: numpy's default hashing
    is many times slower on these arrays)."""
    s = np.sort(np.asarray(ids).reshape(-1))
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if s.size else s


def right_align(ids: np.ndarray, ndim: int) -> np.ndarray:
    return ids.reshape((1,) * (ndim - ids.ndim) + ids.shape)


@dataclass
class Unions:
    """Slot allocation and the union / fix edges between slots."""

    next_id: int = 1
    edges_a: list = field(default_factory=list)
    edges_b: list = field(default_factory=list)
    fixes: list = field(default_factory=list)  # (ids, reason) in order

    def fresh(self, n: int) -> np.ndarray:
        out = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        return out

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        keep = a != b
        if keep.any():
            self.edges_a.append(a[keep])
            self.edges_b.append(b[keep])

    def fix(self, ids: np.ndarray, reason: str) -> None:
        free = ids[ids != FIXED].reshape(-1)
        if free.size:
            self.edges_a.append(free)
            self.edges_b.append(np.zeros_like(free))
            self.fixes.append((distinct(free), reason))

    def components(self, with_fixes: bool = True) -> np.ndarray:
        """Component label of every slot id (scipy connected components)."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = self.next_id
        if self.edges_a:
            a = np.concatenate(self.edges_a)
            b = np.concatenate(self.edges_b)
            if not with_fixes:
                keep = (a != FIXED) & (b != FIXED)
                a, b = a[keep], b[keep]
        else:
            a = b = np.zeros(0, dtype=np.int64)
        m = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
        return connected_components(m, directed=False)[1]
