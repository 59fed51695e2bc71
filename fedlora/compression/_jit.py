"""Fused element-wise kernels for ``affine:b``, compiled by numba (imported only when used).

numpy needs one pass over memory per ufunc (quantize = multiply, add, clamp, narrow; dequantize =
widen, subtract, multiply), each paying its own loop overhead; these kernels do each job in one
pass with the SAME float32 operations in the same order (no fast-math, no FMA contraction: LLVM
only contracts with fast-math flags), so the payload bytes and the decoded values are identical
to the numpy path's — ``tests/test_codecs.py`` checks that bit for bit.

Every kernel works on the flat element range ``[i0, i1)`` of a row-major ``(g, m)`` array with one
parameter per row, so a caller can split any tensor (one long row, many short rows) across
threads; the kernels release the GIL (``nogil``), and
:func:`fedlora.compression.runtime.run_parallel` supplies the threads. Loops run over slices
starting at 0 so numba can prove indices non-negative and LLVM vectorizes them.

Compiled code is cached on disk (numba's ``cache=True``: ``__pycache__`` beside this file, else
numba's user cache directory); where neither is writable the kernels compile per process instead.
"""

from __future__ import annotations

import numba
import numpy as np

_MAG_INT = 12582912  # 1.5 * 2**23, see quantize.py


def cached_njit(fn):
    """numba.njit(nogil, cache): compiled once per machine, where a cache directory is writable."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # pragma: no cover - no writable cache location: compile per process
        return numba.njit(nogil=True)(fn)


@cached_njit
def quantize_range(x, m, inv, madd, lo, hi, i0, i1, u):  # pragma: no cover - compiled
    """``u[i] = clamp(fl(fl(x[i]*inv[r]) + madd[r]), lo, hi) - MAG`` for ``i`` in ``[i0, i1)``,
    ``r = i // m``; returns how many ``t`` were NaN (a NaN/Inf input)."""
    nan = 0
    i = i0
    while i < i1:
        r = i // m
        e = min(i1, (r + 1) * m)
        xs = x[i:e]
        us = u[i:e]
        iv = inv[r]
        ma = madd[r]
        for k in range(xs.size):
            t = xs[k] * iv + ma
            nan += t != t
            t = lo if t < lo else t
            t = hi if t > hi else t
            us[k] = np.uint8(np.int32(t) - np.int32(_MAG_INT))
        i = e
    return nan


@cached_njit
def dequantize_range(u, m, s, zu, i0, i1, out):  # pragma: no cover - compiled
    """``out[i] = fl(fl(float32(u[i]) - zu[r]) * s[r])`` for ``i`` in ``[i0, i1)``, ``r = i // m``."""
    i = i0
    while i < i1:
        r = i // m
        e = min(i1, (r + 1) * m)
        us = u[i:e]
        os_ = out[i:e]
        sr = s[r]
        zr = zu[r]
        for k in range(us.size):
            os_[k] = (np.float32(us[k]) - zr) * sr
        i = e


@cached_njit
def row_minmax(x, r0, r1, mn, mx):  # pragma: no cover - compiled
    """``mn[r], mx[r]`` = min and max of row ``r`` of the 2-D ``x`` (rows of >= 1 value), for
    ``r`` in ``[r0, r1)``; a NaN anywhere in a row makes both NaN (as numpy's reductions). One
    branch-free pass over short rows (lora_B slices of r values), where torch's / numpy's row
    reductions pay a per-row set-up; NaN is tracked beside the comparisons, not by leaving the
    loop, so LLVM can vectorize it."""
    for r in range(r0, r1):
        lo, hi, nan = _row_range(x[r])
        if nan:
            lo = np.float32(np.nan)
            hi = lo
        mn[r] = lo
        mx[r] = hi


@cached_njit
def _row_range(row):  # pragma: no cover - compiled
    """(min, max, whether the row holds a NaN) of a 1-D row of >= 1 value, branch-free (NaN is
    tracked beside the comparisons, so LLVM can vectorize the loop)."""
    lo = row[0]
    hi = row[0]
    nan = lo != lo
    for k in range(1, row.size):
        v = row[k]
        lo = v if v < lo else lo
        hi = v if v > hi else hi
        nan |= v != v
    return lo, hi, nan


@cached_njit
def affine_rows(x, bits, r0, r1, s_out, z_out, u):  # pragma: no cover - compiled
    """All of ``quantize_groups`` for rows ``[r0, r1)`` of a 2-D ``x`` of short rows (lora_B
    slices of r values) in one pass per row while the row is in L1: min/max, the parameters of
    ``quantize.affine_params`` (the same float64 / float32 operations in the same order),
    ``_overflow_bound``'s check, then the values into ``u`` (flat, row-major) as ``quantize_range``
    (and the exact float64 path for a row with ``|z - qmin| >= 2^22``; constant rows set
    directly, as ``quantize_groups`` does). Returns flags: 1 a row held NaN/Inf, 2 a row's grid
    would overflow float32 (its values are then not written)."""
    m = x.shape[1]
    qmin = -(1 << (bits - 1))
    qmax = (1 << (bits - 1)) - 1
    levels = (1 << bits) - 1
    kk0 = float(1 << (bits - 1))
    tiny = np.float32(1.1754943508222875e-38)
    limit = 3.4028234663852886e38 * (1.0 - 2.0 ** -20)
    lo32 = np.float32(_MAG_INT)
    hi32 = np.float32(_MAG_INT + levels)
    flags = 0
    for r in range(r0, r1):
        row = x[r]
        lo, hi, nan = _row_range(row)
        if nan or not (np.isfinite(lo) and np.isfinite(hi)):
            flags |= 1
            continue
        mn = np.float64(lo)
        mx = np.float64(hi)
        us = u[r * m:(r + 1) * m]
        if mn == mx:
            kk = kk0 if abs(mn) / kk0 >= tiny else 1.0
            s = np.float32(abs(mn) / kk) if mn != 0 else np.float32(1.0)
            z = qmax - kk if mn > 0 else (qmin + kk if mn < 0 else float(qmin))
        else:
            s64 = (mx - mn) / levels
            s = np.float32(s64)
            if np.float64(s) < s64:
                s = np.float32(np.nextafter(s, np.float32(np.inf)))
            amax = max(abs(mn), abs(mx))
            s = max(s, np.float32(amax * 2.0 ** -30))
            s = max(s, tiny)
            z = np.rint(qmin - mn / np.float64(s))
        zi = np.int64(z)
        far = float(max(abs(qmin - zi), abs(qmax - zi))) * np.float64(s)
        s_out[r] = s
        z_out[r] = zi
        if far > limit:
            flags |= 2
            continue
        if mn == mx:
            c = np.uint8(levels) if mn > 0 else np.uint8(0)
            for k in range(m):
                us[k] = c
            continue
        inv = np.float32(1.0) / s
        zu = zi - qmin
        if abs(zu) >= (1 << 22):  # far from zero for its spread: exact float64 rounding
            for k in range(m):
                t = np.rint(np.float64(row[k] * inv) + np.float64(zu))
                t = 0.0 if t < 0.0 else t
                t = levels if t > levels else t
                us[k] = np.uint8(t)
            continue
        ma = np.float32(np.float64(zu) + 12582912.0)
        for k in range(m):
            t = row[k] * inv + ma
            t = lo32 if t < lo32 else t
            t = hi32 if t > hi32 else t
            us[k] = np.uint8(np.int32(t) - np.int32(_MAG_INT))
    return flags


@cached_njit
def pack_groups(u, bits, g0, g1, out):  # pragma: no cover - compiled
    """Bit-pack groups ``[g0, g1)`` of 8 ``uint8`` values ``< 2**bits`` (``bits`` in 1..7): group
    ``g``'s values ``u[8g : 8g+8]`` become the ``bits`` bytes ``out[g*bits : (g+1)*bits]``, value
    ``j`` at bits ``[bits*j, bits*(j+1))`` of their little-endian integer (``binary.pack_bits``'s
    LSB-first layout)."""
    for g in range(g0, g1):
        w = np.uint64(0)
        for j in range(8):
            w |= np.uint64(u[8 * g + j]) << np.uint64(bits * j)
        for k in range(bits):
            out[g * bits + k] = np.uint8((w >> np.uint64(8 * k)) & np.uint64(0xFF))


@cached_njit
def unpack_groups(p, bits, g0, g1, u):  # pragma: no cover - compiled
    """Inverse of :func:`pack_groups` for groups ``[g0, g1)``."""
    mask = np.uint64((1 << bits) - 1)
    for g in range(g0, g1):
        w = np.uint64(0)
        for k in range(bits):
            w |= np.uint64(p[g * bits + k]) << np.uint64(8 * k)
        for j in range(8):
            u[8 * g + j] = np.uint8((w >> np.uint64(bits * j)) & mask)


@cached_njit
def affine_section_params(s, z, bits, zu):  # pragma: no cover - compiled
    """The checks and offsets of a decoded affine section's parameters in one pass: returns
    (every scale finite and > 0, ``quantize._overflow_bound(s, z, bits)``) and writes
    ``zu[r] = float32(z[r] - qmin)`` (``quantize._zero_offsets``) — the same operations, for a
    server that reads thousands of small sections a round."""
    qmin = -(1 << (bits - 1))
    qmax = (1 << (bits - 1)) - 1
    ok = True
    bound = 0.0
    for r in range(s.size):
        sr = s[r]
        ok &= (sr > 0) and (sr < np.inf)
        zr = np.int64(z[r])
        far = np.float64(max(abs(qmin - zr), abs(qmax - zr))) * np.float64(sr)
        bound = far if far > bound else bound
        zu[r] = np.float32(zr - qmin)
    return ok, bound
