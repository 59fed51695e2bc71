"""``lowrank:r`` — a rank-``r`` factorisation of each matrix-shaped update (PowerSGD's compressor).

A tensor of shape ``(m, *rest)`` with ``r * (m + n) < m * n`` (``n = prod(rest)``) travels as
factors ``L`` (``r x m``) and ``R`` (``r x n``), each rank component carrying half of its
singular value, of its best rank-``r`` approximation (truncated SVD; a seeded randomized range
finder above 512); every other tensor passes through whole (one group when 1-D). Contractive,
so error feedback keeps what it drops: a codec for updates, refused for weights. The decoder
forms ``L^T R`` in float64 in a fixed order (:func:`product`: same bits on every BLAS) and
refuses a product that overflows float32. ``max_expansion``: 64 (a policy, as ``ranks``' 16).

Rationale (no warm start across rounds), the contraction bound and the section layout:
docs/wire-format.md (``lowrank:r``).
"""

from __future__ import annotations

import math

import numpy as np

from .arrays import check_finite
from .codec import Sparsifier, register
from .errors import CodecError, SpecError

__all__ = ["LowRank", "low_rank_factors", "factored", "product"]

MAX_RANK = 1024
_EXACT_MAX = 512      # min(m, n) up to this: LAPACK's SVD; above: the randomized range finder
_OVERSAMPLE = 8
_POWER_ITERS = 2
_BLOCK = 1 << 16      # float64 values of the decoder's scratch per row block


def factored(shape: tuple[int, ...], rank: int) -> tuple[int, int] | None:
    """``(m, n)`` when a tensor of ``shape`` travels as rank-``rank`` factors, else None."""
    if len(shape) < 2:
        return None
    m, n = int(shape[0]), math.prod(shape[1:])
    if m == 0 or n == 0 or rank * (m + n) >= m * n:
        return None
    return m, n


def low_rank_factors(x2: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(L, R)``, float32 ``r x m`` and ``r x n``, with ``L.T @ R`` the best rank-``r``
    approximation of the finite matrix ``x2`` (``m x n``), ``sqrt`` of each singular value on each
    side. Computed in float64."""
    a = np.asarray(x2, np.float64)
    m, n = a.shape
    if min(m, n) <= _EXACT_MAX:
        u, s, vt = np.linalg.svd(a, full_matrices=False)
    else:  # randomized range finder (Halko, Martinsson, Tropp 2011, alg. 4.4), seeded
        k = min(rank + _OVERSAMPLE, min(m, n))
        rng = np.random.default_rng(0)
        q, _ = np.linalg.qr(a @ rng.standard_normal((n, k)))
        for _ in range(_POWER_ITERS):
            q, _ = np.linalg.qr(a.T @ q)
            q, _ = np.linalg.qr(a @ q)
        ub, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
        u = q @ ub
    root = np.sqrt(s[:rank])
    left = (u[:, :rank] * root).T
    right = vt[:rank] * root[:, None]
    return left.astype(np.float32), right.astype(np.float32)


@register
class LowRank(Sparsifier):
    """Rank-``r`` factors of each matrix-shaped update (see the module docstring)."""

    codec_id = "lowrank"
    for_updates_only = True

    def __init__(self, rank: int):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
            raise SpecError(f"lowrank: rank must be an integer in 1..{MAX_RANK}, got {rank!r}")
        self.rank = rank

    @classmethod
    def from_args(cls, args):
        if len(args) != 1 or not args[0].isdigit():
            raise SpecError(f"lowrank takes one integer rank in 1..{MAX_RANK}: lowrank:2")
        return cls(int(args[0]))

    def spec_part(self):
        return f"lowrank:{self.rank}"

    def get_config(self):
        return {"id": self.codec_id, "rank": self.rank}

    @classmethod
    def from_config(cls, cfg):
        cls.check_config_keys(cfg, ("rank",))
        return cls(cfg.get("rank"))

    def max_expansion(self):
        return 64.0

    @staticmethod
    def _groups(shape) -> int:
        return shape[0] if len(shape) >= 2 else int(math.prod(shape) > 0)

    def _parts(self, x: np.ndarray) -> list[tuple[np.ndarray, int]]:
        mn = factored(x.shape, self.rank)
        if mn is None:
            return [(x, self._groups(x.shape))]
        check_finite(x)
        left, right = low_rank_factors(x.reshape(mn), self.rank)
        return [(left, self.rank), (right, self.rank)]

    def encode_all(self, items, vc, out):
        for _, x in items:
            for part, groups in self._parts(x):
                vc.encode_values(part, groups, out)

    def size_all(self, items, vc):
        return sum(vc.values_size(part, groups)
                   for _, x in items for part, groups in self._parts(x))

    def max_size(self, name, shape, vc):
        mn = factored(shape, self.rank)
        if mn is None:
            return vc.max_values_size(math.prod(shape), self._groups(shape))
        return sum(vc.max_values_size(self.rank * d, self.rank) for d in mn)

    def decode_all(self, r, table, vc):
        out = {}
        for name, shape in table:
            mn = factored(shape, self.rank)
            if mn is None:
                out[name] = vc.decode_values(r, shape, self._groups(shape), name)
                continue
            left = vc.decode_values(r, (self.rank, mn[0]), self.rank, name)
            right = vc.decode_values(r, (self.rank, mn[1]), self.rank, name)
            out[name] = product(left, right, name).reshape(shape)
        return out


def product(left: np.ndarray, right: np.ndarray, name: str = "tensor") -> np.ndarray:
    """``L.T @ R`` (float32 ``r x m`` and ``r x n``) as float32, the same bits on every machine:
    each ``L[k, i] * R[k, j]`` is exact in float64 and the ``r`` terms are added in order ``k = 0,
    1, ...`` one IEEE operation at a time (a BLAS product's summation order depends on the CPU's
    kernels, and a node and the server must decode a download to the same bits: ``downlink``
    checks the node's copy by digest). Row blocks of ~64k values bound the float64 scratch.
    CodecError when a product is beyond float32 (the factors themselves are finite)."""
    rank, m = left.shape
    n = right.shape[1]
    out = np.empty((m, n), np.float32)
    rows = max(1, _BLOCK // max(n, 1))
    lf, rf = left.astype(np.float64), right.astype(np.float64)
    for i0 in range(0, m, rows):
        acc = np.zeros((min(rows, m - i0), n), np.float64)
        term = np.empty_like(acc)
        for k in range(rank):
            np.multiply.outer(lf[k, i0:i0 + rows], rf[k], out=term)
            acc += term
        with np.errstate(over="ignore"):
            block = acc.astype(np.float32)
        if not np.isfinite(block).all():
            raise CodecError(f"tensor {name!r}: its rank-{rank} factors multiply to values "
                             "beyond float32")
        out[i0:i0 + rows] = block
    return out
