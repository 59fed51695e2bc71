"""The server's element-wise passes over an update, compiled by numba: its L2 norm and, fused
with it, the weighted add into a float64 running sum (streaming aggregation).

One definition of the sum of squares serves both aggregation paths (decode-all through
:func:`fedlora.strategies.guard.update_norm`, streamed through :func:`add_and_sumsq`), so a
round's norms — and with them its norm bound and every clip decision — do not depend on the
path. The order of the float64 additions is fixed here (eight interleaved partial sums over the
flat tensor, combined pairwise, then tensor after tensor), not left to numpy's or BLAS's
blocking. The add is ``acc[i] += w * float64(x[i])``: the same IEEE operations, in the same
order per element, as :func:`fedlora.strategies.base.weighted_mean` (no fast-math, so LLVM
never contracts the multiply and add into an FMA), so both paths stay bit-identical.

The kernel releases the GIL; compiled code is cached on disk (``compression/_jit.py``).
"""

from __future__ import annotations

import numpy as np

from ..compression._jit import cached_njit

__all__ = ["sumsq", "add_and_sumsq"]


@cached_njit
def _pass(x, ref, has_ref, acc, w, add):  # pragma: no cover - compiled
    """Σ (x − ref)² in float64 (``ref`` ignored unless ``has_ref``); with ``add`` also
    ``acc += w · x`` (float64 product). Eight partial sums, lanes j = i mod 8."""
    n = x.size
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    i = 0
    while i + 8 <= n:
        d0 = np.float64(x[i])
        d1 = np.float64(x[i + 1])
        d2 = np.float64(x[i + 2])
        d3 = np.float64(x[i + 3])
        d4 = np.float64(x[i + 4])
        d5 = np.float64(x[i + 5])
        d6 = np.float64(x[i + 6])
        d7 = np.float64(x[i + 7])
        if add:
            acc[i] += w * d0
            acc[i + 1] += w * d1
            acc[i + 2] += w * d2
            acc[i + 3] += w * d3
            acc[i + 4] += w * d4
            acc[i + 5] += w * d5
            acc[i + 6] += w * d6
            acc[i + 7] += w * d7
        if has_ref:
            d0 -= np.float64(ref[i])
            d1 -= np.float64(ref[i + 1])
            d2 -= np.float64(ref[i + 2])
            d3 -= np.float64(ref[i + 3])
            d4 -= np.float64(ref[i + 4])
            d5 -= np.float64(ref[i + 5])
            d6 -= np.float64(ref[i + 6])
            d7 -= np.float64(ref[i + 7])
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
        s4 += d4 * d4
        s5 += d5 * d5
        s6 += d6 * d6
        s7 += d7 * d7
        i += 8
    t = 0.0
    while i < n:
        d = np.float64(x[i])
        if add:
            acc[i] += w * d
        if has_ref:
            d -= np.float64(ref[i])
        t += d * d
        i += 1
    return (((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))) + t


_NO_REF = np.zeros(0, np.float32)
_NO_ACC = np.zeros(0, np.float64)


def _flat(a) -> np.ndarray:
    a = np.ravel(np.asarray(a))
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return a


def _ref(reference, k, v):
    if reference is None:
        return _NO_REF, False
    if k not in reference or np.shape(reference[k]) != np.shape(v):
        raise ValueError(f"{k}: the reference has no tensor of the update's shape "
                         f"{np.shape(v)}")
    return _flat(reference[k]), True


def sumsq(tensors, reference=None) -> float:
    """Σ over the tensors (in order) of Σ (x − reference)² in float64 (see the module doc)."""
    total = 0.0
    for k, v in tensors.items():
        r, has = _ref(reference, k, v)
        total += _pass(_flat(v), r, has, _NO_ACC, 0.0, False)
    return total


def add_and_sumsq(acc, tensors, w: float, reference=None) -> float:
    """``acc[k] += w · tensors[k]`` (float64 ``acc``, same shapes) and, in the same pass, what
    :func:`sumsq` returns for ``tensors`` and ``reference``."""
    work = []
    for k, v in tensors.items():  # every check before the first add: all or nothing
        if k not in acc or acc[k].shape != np.shape(v) or acc[k].dtype != np.float64:
            raise ValueError(f"{k}: no float64 running sum of the update's shape "
                             f"{np.shape(v)}")
        work.append((_flat(v), acc[k].reshape(-1), *_ref(reference, k, v)))
    if len(work) != len(acc):
        raise ValueError(f"the update has {len(work)} tensors, the running sum {len(acc)}")
    total = 0.0
    for x, out, r, has in work:
        total += _pass(x, r, has, out, float(w), True)
    return total
