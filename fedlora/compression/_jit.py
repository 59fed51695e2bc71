"""Fused element-wise kernels for ``affine:b``, compiled by numba (imported only when used).

Each kernel does in one pass what numpy does in several, with the SAME float32 operations in the
same order (no fast-math, no FMA contraction), so payload bytes and decoded values equal the
numpy path's bit for bit (``tests/test_codecs.py``). Kernels work on the flat element range
``[i0, i1)`` of a row-major ``(g, m)`` array with one parameter per row and release the GIL;
:func:`fedlora.compression.runtime.run_parallel` supplies the threads. Compiled code is cached
on disk (numba's ``cache=True``) where writable, else compiled per process. Why and how:
docs/codecs.md ("Implementation notes").
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
def _row_range_long(row):  # pragma: no cover - compiled
    """:func:`_row_range` of a long row: the float32 bits mapped to int32 keys in the order of
    the values (``v ^ ((v >> 31) & 0x7fffffff)``), whose min/max reductions LLVM vectorizes
    without fast-math (the float selects it does not: ~6x slower on 31,250 values). Only the
    sign of a zero extreme may differ from :func:`_row_range` (-0 orders below +0), which no
    parameter depends on; NaN is reported, Inf is an extreme (the caller's isfinite)."""
    v = row.view(np.int32)
    lo = np.int32(0x7FFFFFFF)
    hi = np.int32(-0x80000000)
    nan = np.int32(0)
    for k in range(v.size):
        b = v[k]
        key = b ^ ((b >> 31) & np.int32(0x7FFFFFFF))
        lo = min(lo, key)
        hi = max(hi, key)
        nan |= np.int32((b & np.int32(0x7FFFFFFF)) > np.int32(0x7F800000))
    out = np.empty(2, np.int32)
    out[0] = lo ^ ((lo >> 31) & np.int32(0x7FFFFFFF))
    out[1] = hi ^ ((hi >> 31) & np.int32(0x7FFFFFFF))
    f = out.view(np.float32)
    return f[0], f[1], nan != 0


_ROW_BLOCK = 64  # rows whose parameters affine_rows computes together


@cached_njit
def dequantize_fields(p, bits, k0, k1, s, zu, out):  # pragma: no cover - compiled
    """``out[k - k0] = fl(fl(float32(u_k) - zu) * s)`` for ``k`` in ``[k0, k1)``, ``u_k`` the
    ``bits``-wide field ``k`` of the packed bytes ``p`` (LSB-first, as ``pack_groups`` packs
    them): one slice's values, as ``dequantize_range`` computes them. Whole bytes for 8 bits,
    two fields a byte for 4; other widths field by field."""
    if bits == 8:
        for k in range(k0, k1):
            out[k - k0] = (np.float32(p[k]) - zu) * s
    elif bits == 4:
        k = k0
        if k & 1 and k < k1:  # a slice that starts on a high nibble
            out[0] = (np.float32(p[k >> 1] >> 4) - zu) * s
            k += 1
        o = out[k - k0:]
        b = p[k >> 1:]
        pairs = (k1 - k) >> 1
        for j in range(pairs):  # two values a byte, low nibble first
            byte = b[j]
            o[2 * j] = (np.float32(byte & 15) - zu) * s
            o[2 * j + 1] = (np.float32(byte >> 4) - zu) * s
        k += 2 * pairs
        if k < k1:
            out[k - k0] = (np.float32(p[k >> 1] & 15) - zu) * s
    else:
        mask = (1 << bits) - 1
        for k in range(k0, k1):
            pos = k * bits
            j = pos >> 3
            sh = pos & 7
            v = np.int64(p[j])
            if sh + bits > 8:
                v |= np.int64(p[j + 1]) << 8
            out[k - k0] = (np.float32((v >> sh) & mask) - zu) * s


@cached_njit
def affine_rows(x, bits, r0, r1, s_out, z_out, u):  # pragma: no cover - compiled
    """All of ``quantize_groups`` for rows ``[r0, r1)`` of a 2-D ``x`` of short rows (lora_B
    slices of r values), a block of 64 rows at a time: each row's min/max while it is in L1,
    then the block's parameters of ``quantize.affine_params`` (the same float64 / float32
    operations in the same order) in loops across the rows that LLVM vectorizes (one row at a
    time, its dependent divisions were half the time), ``_overflow_bound``'s check, then the
    values into ``u`` (flat, row-major) as ``quantize_range`` (and the exact float64 path for a
    row with ``|z - qmin| >= 2^22``; constant rows set directly, as ``quantize_groups`` does).
    Returns flags: 1 a row held NaN/Inf, 2 a row's grid would overflow float32 (its values are
    then not written)."""
    m = x.shape[1]
    qmin = -(1 << (bits - 1))
    qmax = (1 << (bits - 1)) - 1
    levels = (1 << bits) - 1
    kk0 = float(1 << (bits - 1))
    tiny = np.float32(1.1754943508222875e-38)
    limit = 3.4028234663852886e38 * (1.0 - 2.0 ** -20)
    lo32 = np.float32(_MAG_INT)
    hi32 = np.float32(_MAG_INT + levels)
    MN = np.empty(_ROW_BLOCK)
    MX = np.empty(_ROW_BLOCK)
    BAD = np.zeros(_ROW_BLOCK, np.bool_)
    S64 = np.empty(_ROW_BLOCK)
    S = np.empty(_ROW_BLOCK, np.float32)
    Sbits = S.view(np.int32)
    Z = np.empty(_ROW_BLOCK)
    flags = 0
    for b0 in range(r0, r1, _ROW_BLOCK):
        nb = min(_ROW_BLOCK, r1 - b0)
        for j in range(nb):
            lo, hi, nan = _row_range(x[b0 + j]) if m < 256 else _row_range_long(x[b0 + j])
            bad = nan or not (np.isfinite(lo) and np.isfinite(hi))
            BAD[j] = bad
            MN[j] = 0.0 if bad else np.float64(lo)  # (a bad row's parameters are not used)
            MX[j] = 1.0 if bad else np.float64(hi)
        # a non-constant row's parameters, every row of the block at once (a constant row's
        # are replaced below): s = float32((mx - mn) / levels) rounded up, at least
        # amax * 2^-30 and the smallest normal; z = rint(qmin - mn / s)
        for j in range(nb):
            S64[j] = (MX[j] - MN[j]) / levels
            S[j] = np.float32(S64[j])
        for j in range(nb):  # nextafter(s, +inf) of a finite s >= 0: its bits + 1
            Sbits[j] += np.int32(np.float64(S[j]) < S64[j])
        for j in range(nb):
            amax = max(abs(MN[j]), abs(MX[j]))
            S[j] = max(max(S[j], np.float32(amax * 2.0 ** -30)), tiny)
        for j in range(nb):
            Z[j] = np.rint(qmin - MN[j] / np.float64(S[j]))
        for j in range(nb):
            r = b0 + j
            if BAD[j]:
                flags |= 1
                continue
            mn = MN[j]
            s = S[j]
            z = Z[j]
            if mn == MX[j]:
                kk = kk0 if abs(mn) / kk0 >= tiny else 1.0
                s = np.float32(abs(mn) / kk) if mn != 0 else np.float32(1.0)
                z = qmax - kk if mn > 0 else (qmin + kk if mn < 0 else float(qmin))
            zi = np.int64(z)
            far = float(max(abs(qmin - zi), abs(qmax - zi))) * np.float64(s)
            s_out[r] = s
            z_out[r] = zi
            if far > limit:
                flags |= 2
                continue
            us = u[r * m:(r + 1) * m]
            if mn == MX[j]:
                c = np.uint8(levels) if mn > 0 else np.uint8(0)
                for k in range(m):
                    us[k] = c
                continue
            row = x[r]
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


_EXP32 = np.uint32(0x7F800000)  # float32 exponent bits: all set = Inf or NaN


@cached_njit
def _u32(b, o):  # pragma: no cover - compiled
    """The little-endian uint32 at ``b[o:o + 4]``."""
    return (np.uint32(b[o]) | (np.uint32(b[o + 1]) << np.uint32(8))
            | (np.uint32(b[o + 2]) << np.uint32(16)) | (np.uint32(b[o + 3]) << np.uint32(24)))


@cached_njit
def zero_point(b, o, zw):  # pragma: no cover - compiled
    """The little-endian signed integer of ``zw`` (1, 2 or 4) bytes at ``b[o:]``."""
    if zw == 1:
        z = np.int64(b[o])
        return z - 256 if z >= 128 else z
    if zw == 2:
        z = np.int64(b[o]) | (np.int64(b[o + 1]) << 8)
        return z - 65536 if z >= 32768 else z
    z = np.int64(_u32(b, o))
    return z - 4294967296 if z >= 2147483648 else z


@cached_njit
def scan_affine(b, pos, end, ns, groups, bits, limit, S, ZU, offs,
                gofs):  # pragma: no cover - compiled
    """Check the body ``b[pos:end]`` of a dense ``affine:bits`` (``bits == 0``: ``fp32``)
    chain whose tensors have ``ns`` values split into ``groups`` slices (0: raw float32) and
    record it, making every check ``read_section`` makes, tensor after tensor: raw values
    finite; zero-point width 1, 2 or 4; the section inside the body; scales finite and > 0;
    the overflow bound (``affine_section_params``) at most ``limit``; zero padding bits; no
    byte after the last section. Tensor ``t``'s values start at ``b[offs[t]]``; its scales
    (``S``, float32) and zero offsets ``float32(z − qmin)`` (``ZU``) are entries
    ``gofs[t]:gofs[t] + groups[t]``. Returns False where ``read_section`` would (or might)
    refuse the body."""
    qmin = -(1 << (bits - 1)) if bits else 0
    qmax = (1 << (bits - 1)) - 1 if bits else 0
    S8 = S.view(np.uint8)
    g0 = 0
    for t in range(ns.size):
        n = ns[t]
        g = groups[t]
        gofs[t] = g0
        if bits == 0 or g == 0:
            if 4 * n > end - pos:
                return False
            for i in range(n):
                if (_u32(b, pos + 4 * i) & _EXP32) == _EXP32:
                    return False
            offs[t] = pos
            pos += 4 * n
            continue
        if g < 0 or n % g:
            return False
        if pos >= end:
            return False
        zw = np.int64(b[pos])
        pos += 1
        if zw != 1 and zw != 2 and zw != 4:
            return False
        nb = (n * bits + 7) // 8
        if g * (4 + zw) + nb > end - pos:
            return False
        S8[4 * g0:4 * (g0 + g)] = b[pos:pos + 4 * g]
        pos += 4 * g
        bound = 0.0
        for r in range(g):
            sr = S[g0 + r]
            if not (sr > 0 and sr < np.inf):
                return False
            z = zero_point(b, pos + zw * r, zw)
            far = np.float64(max(abs(qmin - z), abs(qmax - z))) * np.float64(sr)
            bound = far if far > bound else bound
            ZU[g0 + r] = np.float32(z - qmin)
        if bound > limit:
            return False
        pos += zw * g
        if nb:
            used = n * bits - 8 * (nb - 1)
            if used < 8 and (np.int64(b[pos + nb - 1]) >> used) != 0:
                return False
        offs[t] = pos
        pos += nb
        g0 += g
    return pos == end
