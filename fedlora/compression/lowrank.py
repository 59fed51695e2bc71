"""``lowrank:r`` — a rank-``r`` factorisation of each matrix-shaped update (PowerSGD's compressor).

Vogels et al., 2019, "PowerSGD: Practical Low-Rank Gradient Compression": a tensor of shape
``(m, *rest)`` is the matrix ``M`` of ``m`` rows and ``n = prod(rest)`` columns (a conv kernel
``[C_out, C_in, k, k]`` is ``C_out x C_in*k*k``) and travels as two factors whose product is its
best rank-``r`` approximation. PowerSGD finds the factors with one warm-started power iteration per
step; a federated update arrives once a round from a node that may not have been sampled for many
rounds, so there is no warm start to keep: the factors here are the truncated SVD itself (exact for
``min(m, n) <= 512``, else a seeded randomized range finder with two power iterations, Halko et al.
2011), the best rank-``r`` approximation in Frobenius norm. It is contractive, ``||M - M_r||^2 <=
(1 - r/min(m, n)) ||M||^2``, so client error feedback and the server's download error feedback keep
what it drops instead of losing it (use it for updates: ``upload=delta`` / ``download=delta``; a
weight matrix cut to rank ``r`` would be a different model, so the strategy refuses it for weights,
as ``sign``).

Factored tensors: ndim >= 2 with ``r * (m + n) < m * n`` (the factors are smaller than the matrix).
With ``M ~ U S V^T`` (singular values in decreasing order), ``L = (U_r sqrt(S_r))^T`` (``r x m``)
and ``R = (V_r sqrt(S_r))^T`` (``r x n``): each rank component gets half of its singular value, so
both factors have the same scale per component, which is what a per-slice value coder wants. The
decoder returns ``reshape(L^T R)``. Every other tensor (1-D norms and biases, matrices too small to
gain) passes through whole.

Per-tensor section, no bytes of its own (the shapes and ``r`` say which tensors are factored)::

    factored   value section of L (r x m, r groups), then value section of R (r x n, r groups)
    otherwise  value section of the tensor, grouped per dim-0 slice when ndim >= 2 and as ONE
               group otherwise (so ``affine`` quantizes a norm's update instead of sending raw
               float32: this sparsifier is for updates only)

The decoder forms the product in float64, term by term in a fixed order (:func:`product`), so a
node and the server decode a payload to the same bits whatever their BLAS, and refuses factors
whose product overflows float32 (the value coder guarantees finite factors, not a finite product). ``max_expansion`` (the decoder's memory contract without expected
shapes, ``payload.py``): 64, a policy like ``ranks``' 16: a rank-``r`` factorisation of a square
``d x d`` matrix expands ``d / 2r`` times (ResNet-8's widest conv at rank 2: 29x); larger ones
decode with the expected shapes, as fedlora's peers always pass them.
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
