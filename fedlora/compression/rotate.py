"""The randomized Hadamard rotation of ``drive`` / ``eden:b`` (``eden.py``): codec keys, the chunk
plan, and the numba kernels (imported only when such a codec runs).

* :func:`key_tag`: 32 bits of a hash of the codec key, carried in the body so a receiver that
  derived another key refuses the payload (the key itself never travels).
* :func:`chunk_plan`: the concatenated values cut into chunks of ``MAX_CHUNK`` (2^14), the
  rest by its binary digits down to ``MIN_CHUNK`` (256), then one zero-padded power of two:
  fewer than 256 padded values per message.
* Rotation of a chunk: ``z = H D x / ||x||`` (``D`` random signs from splitmix64 of the chunk
  key); decoding computes ``x' = T * D H c``. Sub-bit sampling: one position in each of ``k``
  equal strata, from the key (:func:`_strata`).

The exact sign bits, strata and scaling: docs/wire-format.md ("The rotation").
"""

from __future__ import annotations

import functools

import numba
import numpy as np

MAX_CHUNK = 1 << 14
MIN_CHUNK = 1 << 8
_M64 = 0xFFFFFFFFFFFFFFFF
_TAG_SALT = np.uint64(0x5F3759DF2B7E1516)
_SAMPLE_SALT = np.uint64(0x243F6A8885A308D3)


def key_tag(key: int) -> int:
    """32 bits the body carries so that a receiver with another key refuses the payload."""
    return int(_mix(np.uint64(key & _M64) ^ _TAG_SALT)) & 0xFFFFFFFF


@functools.lru_cache(maxsize=64)
def chunk_plan(m: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, sizes)`` of the chunks of ``m`` values (int64; every size a power of two, all
    but the last at least ``MIN_CHUNK``, so every chunk starts on a byte at any bit width)."""
    sizes = [MAX_CHUNK] * (m // MAX_CHUNK)
    rest = m - MAX_CHUNK * len(sizes)
    step = MAX_CHUNK // 2
    while step >= MIN_CHUNK:
        if rest >= step:
            sizes.append(step)
            rest -= step
        step //= 2
    if rest:
        sizes.append(1 << (rest - 1).bit_length())
    sz = np.array(sizes, np.int64)
    starts = np.concatenate([[0], np.cumsum(sz)[:-1]]).astype(np.int64) if sizes else sz
    sz.flags.writeable = False
    starts.flags.writeable = False
    return starts, sz


def cached_njit(fn):
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # pragma: no cover - no writable cache location
        return numba.njit(nogil=True)(fn)


@cached_njit
def _mix(z):  # pragma: no cover - compiled
    """splitmix64's output function of ``z + golden``."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@cached_njit
def _chunk_key(key, c):  # pragma: no cover - compiled
    return _mix(key ^ _mix(np.uint64(c)))


@cached_njit
def _bfly8(a, i):  # pragma: no cover - compiled
    """The 8-point Walsh–Hadamard transform of ``a[i:i+8]`` in place (three stages)."""
    a0 = a[i] + a[i + 1]
    a1 = a[i] - a[i + 1]
    a2 = a[i + 2] + a[i + 3]
    a3 = a[i + 2] - a[i + 3]
    a4 = a[i + 4] + a[i + 5]
    a5 = a[i + 4] - a[i + 5]
    a6 = a[i + 6] + a[i + 7]
    a7 = a[i + 6] - a[i + 7]
    b0 = a0 + a2
    b2 = a0 - a2
    b1 = a1 + a3
    b3 = a1 - a3
    b4 = a4 + a6
    b6 = a4 - a6
    b5 = a5 + a7
    b7 = a5 - a7
    a[i] = b0 + b4
    a[i + 4] = b0 - b4
    a[i + 1] = b1 + b5
    a[i + 5] = b1 - b5
    a[i + 2] = b2 + b6
    a[i + 6] = b2 - b6
    a[i + 3] = b3 + b7
    a[i + 7] = b3 - b7


@cached_njit
def _fwht_from(a, d, h):  # pragma: no cover - compiled
    """The stages ``h, 2h, ..., d/2`` of the transform of ``a[:d]``, two a pass (radix 4)."""
    while 4 * h <= d:
        for i in range(0, d, 4 * h):
            p = a[i:i + h]
            q = a[i + h:i + 2 * h]
            r = a[i + 2 * h:i + 3 * h]
            s = a[i + 3 * h:i + 4 * h]
            for j in range(h):
                x0 = p[j] + q[j]
                x1 = p[j] - q[j]
                x2 = r[j] + s[j]
                x3 = r[j] - s[j]
                p[j] = x0 + x2
                r[j] = x0 - x2
                q[j] = x1 + x3
                s[j] = x1 - x3
        h *= 4
    while h < d:
        for i in range(0, d, 2 * h):
            p = a[i:i + h]
            q = a[i + h:i + 2 * h]
            for j in range(h):
                x = p[j]
                y = q[j]
                p[j] = x + y
                q[j] = x - y
        h *= 2


_BYTE_MAGIC = np.uint64(0x0102040810204080)  # 8 bytes of 0/1 -> their low bits as one byte
_L1 = 4096  # values (16 KiB) whose stages run together while they stay in the L1 cache


@cached_njit
def _fwht_blocked(a, d, h):  # pragma: no cover - compiled
    """:func:`_fwht_from`, the stages below ``_L1`` block by block (each value still gets its
    stages in order, so the result is the same bit for bit), then the rest over ``a[:d]``:
    2 passes over a 16,384-value chunk in L2 instead of 6 (-20% of the transform's time)."""
    if d <= _L1 or h >= _L1:
        _fwht_from(a, d, h)
        return
    for b in range(0, d, _L1):
        _fwht_from(a[b:b + _L1], _L1, h)
    _fwht_from(a, d, _L1)


@cached_njit
def fwht(a, d):  # pragma: no cover - compiled
    """In-place unnormalized Walsh–Hadamard transform of ``a[:d]`` (``d`` a power of two): the
    three smallest stages as 8-point butterflies in registers, then two stages a pass."""
    if d >= 8:
        for i in range(0, d, 8):
            _bfly8(a, i)
        _fwht_blocked(a, d, 8)
    else:
        _fwht_from(a, d, 1)


def _tables():
    """``SGN[b, j]`` = -1.0 where bit ``j`` of ``b`` is set, else 1.0 (the signs of ``D`` for a
    byte of the sign stream); ``WHT8[b]`` = the 8-point transform of ``2 bit_j(b) - 1`` (the
    first three stages of a 1-bit decode, by table)."""
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
    h = np.array([[1.0]])
    while h.shape[0] < 8:
        h = np.block([[h, h], [h, -h]])
    return (1.0 - 2.0 * bits).astype(np.float32), ((2.0 * bits - 1.0) @ h).astype(np.float32)


SGN, WHT8 = _tables()
SGNF, WHT8F = SGN.reshape(-1).copy(), WHT8.reshape(-1).copy()  # flat: row b at [8 b, 8 b + 8)


@cached_njit
def _load8_run(x, s, g0, g1, kc, sgn, buf, lanes):  # pragma: no cover - compiled
    """Groups ``[g0, g1)`` (``g0`` a multiple of 8) of 8 values of :func:`_load8`: ``buf[8 g:8 g +
    8]`` = the 8-point transform of ``D x[s + 8 g:s + 8 g + 8]``; each value's square added to
    its float32 lane, ``lanes`` carried in and out (in registers between: an array of 8 made
    every group a load and a store on one chain)."""
    q0 = lanes[0]
    q1 = lanes[1]
    q2 = lanes[2]
    q3 = lanes[3]
    q4 = lanes[4]
    q5 = lanes[5]
    q6 = lanes[6]
    q7 = lanes[7]
    for w in range(g0 >> 3, (g1 + 7) >> 3):  # one word of the sign stream: 8 groups of 8
        word = _mix(kc + np.uint64(w))
        for gg in range(min(8, g1 - 8 * w)):
            r = np.int64((word >> np.uint64(8 * gg)) & np.uint64(255)) * 8
            o = 64 * w + 8 * gg
            i = s + o
            a0 = x[i] * sgn[r]
            a1 = x[i + 1] * sgn[r + 1]
            a2 = x[i + 2] * sgn[r + 2]
            a3 = x[i + 3] * sgn[r + 3]
            a4 = x[i + 4] * sgn[r + 4]
            a5 = x[i + 5] * sgn[r + 5]
            a6 = x[i + 6] * sgn[r + 6]
            a7 = x[i + 7] * sgn[r + 7]
            q0 += a0 * a0
            q1 += a1 * a1
            q2 += a2 * a2
            q3 += a3 * a3
            q4 += a4 * a4
            q5 += a5 * a5
            q6 += a6 * a6
            q7 += a7 * a7
            buf[o] = a0
            buf[o + 1] = a1
            buf[o + 2] = a2
            buf[o + 3] = a3
            buf[o + 4] = a4
            buf[o + 5] = a5
            buf[o + 6] = a6
            buf[o + 7] = a7
            _bfly8(buf, o)
    lanes[0] = q0
    lanes[1] = q1
    lanes[2] = q2
    lanes[3] = q3
    lanes[4] = q4
    lanes[5] = q5
    lanes[6] = q6
    lanes[7] = q7


@cached_njit
def _lanes_sum(x, s, v, lanes):  # pragma: no cover - compiled
    """``sum x^2`` from the 8 float32 lanes, in float64 (a fixed order); exactly in float64
    (:func:`_sumsq8`) when that leaves (1e-30, 1e30): underflow, overflow, NaN or zero."""
    g2 = 0.0
    for j in range(8):
        g2 += np.float64(lanes[j])
    if not (1e-30 < g2 < 1e30):
        g2 = _sumsq8(x[s:s + v])
    return g2


@cached_njit
def _load8(x, s, v, kc, sgn, buf, lanes):  # pragma: no cover - compiled
    """``buf[:8 ceil(v/8)]`` = the 8-point transforms of ``D x[s:s+v]`` (zero beyond ``v``; ``sgn``
    the flat sign rows ``SGNF``),
    and ``sum x^2`` (8 float32 lanes, a fixed order; float64 when that leaves (1e-30, 1e30)),
    in one pass (``lanes``: 8 float32 of scratch)."""
    lanes[:] = np.float32(0.0)
    full = v >> 3
    _load8_run(x, s, 0, full, kc, sgn, buf, lanes)
    if v > 8 * full:
        word = _mix(kc + np.uint64(full >> 3))
        r = np.int64((word >> np.uint64(8 * (full & 7))) & np.uint64(255)) * 8
        for j in range(8):
            i = 8 * full + j
            if i < v:
                t = x[s + i] * sgn[r + j]
                lanes[j] += t * t
                buf[i] = t
            else:
                buf[i] = np.float32(0.0)
        _bfly8(buf, 8 * full)
    return _lanes_sum(x, s, v, lanes)


@cached_njit
def _sumsq8(x):  # pragma: no cover - compiled
    """``sum x^2`` of a 1-D array in float64, in 8 lanes (in registers; the order is fixed)."""
    q0 = q1 = q2 = q3 = q4 = q5 = q6 = q7 = 0.0
    e = x.size & ~7
    for i in range(0, e, 8):
        t0 = np.float64(x[i])
        t1 = np.float64(x[i + 1])
        t2 = np.float64(x[i + 2])
        t3 = np.float64(x[i + 3])
        t4 = np.float64(x[i + 4])
        t5 = np.float64(x[i + 5])
        t6 = np.float64(x[i + 6])
        t7 = np.float64(x[i + 7])
        q0 += t0 * t0
        q1 += t1 * t1
        q2 += t2 * t2
        q3 += t3 * t3
        q4 += t4 * t4
        q5 += t5 * t5
        q6 += t6 * t6
        q7 += t7 * t7
    g = 0.0
    g += q0
    g += q1
    g += q2
    g += q3
    g += q4
    g += q5
    g += q6
    g += q7
    for i in range(e, x.size):
        g += np.float64(x[i]) * np.float64(x[i])
    return g


@cached_njit
def _load(x, xb, s, v, kc, bb):  # pragma: no cover - compiled
    """``buf[:v] = D x[s:s+v]`` (the sign bit of value ``i`` flipped where bit ``i`` of the
    chunk's sign stream is set: ``bb``, ``xb`` are the uint32 views) and ``sum x^2`` in float64
    (8 lanes, a fixed order), in one pass."""
    acc = np.zeros(8)
    full = v >> 6
    for w in range(full):
        bits = _mix(kc + np.uint64(w))
        o = 64 * w
        for j in range(64):
            t = np.float64(x[s + o + j])
            acc[j & 7] += t * t
            bb[o + j] = xb[s + o + j] ^ (np.uint32((bits >> np.uint64(j)) & np.uint64(1)) << 31)
    if v > 64 * full:
        bits = _mix(kc + np.uint64(full))
        for i in range(64 * full, v):
            t = np.float64(x[s + i])
            acc[i & 7] += t * t
            bb[i] = xb[s + i] ^ (np.uint32((bits >> np.uint64(i & 63)) & np.uint64(1)) << 31)
    g = 0.0
    for j in range(8):
        g += acc[j]
    return g


@cached_njit
def _quantize(buf, d, bits, bounds, cents, lab, packed, o, nbytes):  # pragma: no cover
    """Labels of ``buf[:d]`` packed into ``packed[o:o+nbytes]`` (LSB first); returns
    ``(<c, z>, ||c||^2)`` in float64 (8 lanes)."""
    cz = np.zeros(8)
    cc = np.zeros(8)
    if bits == 1:  # the sign: label 1 for z >= 0 (c = +1), 0 for z < 0 (c = -1)
        # labels a byte each in a loop the compiler vectorizes, then 8 of them (a uint64) to
        # a byte by one multiply: bit j of (u * 0x0102040810204080) >> 56 is byte j's low bit
        # (the shifted copies never overlap); half the time of packing value by value
        e = 8 * (d // 8)
        for i in range(e):
            lab[i] = buf[i] >= 0
        lab64 = lab[:e].view(np.uint64)
        for grp in range(d // 8):
            packed[o + grp] = np.uint8((lab64[grp] * _BYTE_MAGIC) >> np.uint64(56))
        # |z| <= 2^114 (the caller's range): float32 lanes, in registers
        q0 = q1 = q2 = q3 = q4 = q5 = q6 = q7 = np.float32(0.0)
        for grp in range(d // 8):
            i = 8 * grp
            q0 += abs(buf[i])
            q1 += abs(buf[i + 1])
            q2 += abs(buf[i + 2])
            q3 += abs(buf[i + 3])
            q4 += abs(buf[i + 4])
            q5 += abs(buf[i + 5])
            q6 += abs(buf[i + 6])
            q7 += abs(buf[i + 7])
        cz[0] += np.float64(q0)
        cz[1] += np.float64(q1)
        cz[2] += np.float64(q2)
        cz[3] += np.float64(q3)
        cz[4] += np.float64(q4)
        cz[5] += np.float64(q5)
        cz[6] += np.float64(q6)
        cz[7] += np.float64(q7)
        byte = 0
        for j in range(d - 8 * (d // 8)):  # a chunk of 1, 2 or 4 values
            z = buf[8 * (d // 8) + j]
            byte |= np.int64(z >= 0) << j
            cz[j] += abs(np.float64(z))
        if d % 8:
            packed[o + d // 8] = np.uint8(byte)
        return cz.sum(), np.float64(d)
    nb = bounds.size
    for i in range(d):
        z = buf[i]
        q = 0
        for k in range(nb):
            q += z >= bounds[k]
        lab[i] = q
        cv = np.float64(cents[q])
        cz[i & 7] += cv * np.float64(z)
        cc[i & 7] += cv * cv
    for i in range(d, d + 8):
        lab[i] = 0
    for grp in range((d + 7) // 8):  # 8 labels -> `bits` bytes
        w = np.uint64(0)
        for j in range(8):
            w |= np.uint64(lab[8 * grp + j]) << np.uint64(bits * j)
        for k in range(bits):
            if bits * grp + k < nbytes:
                packed[o + bits * grp + k] = np.uint8((w >> np.uint64(8 * k)) & np.uint64(255))
    return cz.sum(), cc.sum()


@cached_njit
def encode_chunks(x, m, starts, sizes, key, bits, bounds, cents, unbiased, wmax, limit, c0, c1,
                  T, packed, n, sample):  # pragma: no cover - compiled
    """Rotate, quantize and pack chunks ``[c0, c1)`` of the ``m`` values ``x`` (``sample``: of the
    ``m`` values at the strata positions (:func:`_strata`) among the ``n`` values ``x``, gathered
    chunk by chunk into cache, not into a second array): labels
    (``bits`` wide, the bucket of each rotated value among the sorted ``bounds``) into
    ``packed`` at the chunk's byte, the chunk's scale into ``T`` (unbiased: ``||x|| / <c, z>``;
    else the least-squares ``||x|| <c, z> / (d ||c||^2)``). Returns flags: 1 a value is NaN or
    Inf, 2 a scale whose decoded values could overflow float32 (``T d max|c| wmax > limit``)."""
    dmax = 0
    for c in range(c0, c1):
        dmax = max(dmax, sizes[c])
    buf = np.empty(dmax, np.float32)
    bb = buf.view(np.uint32)
    xs = np.empty(dmax if sample else 0, np.float32)  # a chunk's sampled values
    lab = np.zeros(8 * ((dmax + 15) // 8), np.uint8)  # >= dmax + 8, whole uint64 words
    lanes = np.empty(8, np.float32)
    bsc = np.empty(bounds.size, np.float32)
    sgn = SGNF
    cmax = max(abs(cents[0]), abs(cents[cents.size - 1]))
    flags = 0
    for c in range(c0, c1):
        s = starts[c]
        d = sizes[c]
        v = min(d, m - s)
        kc = _chunk_key(key, c)
        if sample:
            _strata(n, m, key, s, s + v, False, False, x, xs)
            src = xs
            s0 = 0
        else:
            src = x
            s0 = s
        xb = src.view(np.uint32)
        h0 = 1
        if d >= 8:  # D x and the first three stages in one pass
            g2 = _load8(src, s0, v, kc, sgn, buf, lanes)
            h0 = 8
        else:
            g2 = _load(src, xb, s0, v, kc, bb)
        if not (g2 < np.inf):  # NaN or Inf
            flags |= 1
            continue
        o = (s * bits) >> 3
        nbytes = (d * bits + 7) >> 3
        if g2 == 0.0:
            T[c] = np.float32(0.0)
            for j in range(nbytes):
                packed[o + j] = 0
            continue
        g = np.sqrt(g2)
        f = 1.0  # buf = f D x; the transform of unscaled values stays far from over/underflow
        if not (2.0 ** -100 < g < 2.0 ** 100):
            f = 1.0 / g
            _load(src, xb, s0, v, kc, bb)
            for i in range(v):
                buf[i] = np.float32(np.float64(buf[i]) * f)
            h0 = 1
        if h0 == 8:
            for i in range(8 * ((v + 7) // 8), d):
                buf[i] = np.float32(0.0)
            _fwht_blocked(buf, d, 8)
        else:
            for i in range(v, d):
                buf[i] = np.float32(0.0)
            fwht(buf, d)
        # buf = z_raw = f H D x = f g z, z of norm sqrt(d)
        for k in range(bounds.size):
            bsc[k] = np.float32(bounds[k] * (f * g))
        cz, cc = _quantize(buf, d, bits, bsc, cents, lab, packed, o, nbytes)
        t = g2 * f / cz if unbiased else cz / (f * d * cc)
        if not (t * d * cmax * wmax <= limit):
            flags |= 2
            continue
        T[c] = np.float32(t)
    return flags


@cached_njit
def decode_chunks(packed, m, starts, sizes, key, bits, cents, T, c0, c1, out, n, sample,
                  weighted):  # pragma: no cover - compiled
    """Inverse of :func:`encode_chunks` for chunks ``[c0, c1)``: ``out[s + i] = D_i * (T *
    (H c)_i)`` for the chunk's ``min(d, m - s)`` values (``sample``: those values at their
    strata positions among the ``n`` of ``out``, times the strata sizes when ``weighted``, every
    other value of the chunk's strata written 0, so ``out`` needs no zeroing: :func:`_place`).
    Returns 1 when a chunk of scale 0 has a non-zero label (the encoder writes zeros), else 0;
    the caller checked the scales."""
    dmax = 0
    for c in range(c0, c1):
        dmax = max(dmax, sizes[c])
    buf = np.empty(dmax + 8, np.float32)
    vbuf = np.empty(dmax if sample else 0, np.float32)
    sgn = SGNF
    wht8 = WHT8F
    mask = np.uint64((1 << bits) - 1)
    bad = 0
    for c in range(c0, c1):
        s = starts[c]
        d = sizes[c]
        v = min(d, m - s)
        o = (s * bits) >> 3
        nbytes = (d * bits + 7) >> 3
        if sample:
            dst = vbuf
            ds = 0
        else:
            dst = out
            ds = s
        t = T[c]
        if t == 0:
            for j in range(nbytes):
                bad |= packed[o + j] != 0
            for i in range(v):
                dst[ds + i] = np.float32(0.0)
        else:
            _decode_chunk(packed, o, nbytes, d, v, bits, mask, cents, wht8, sgn, t,
                          _chunk_key(key, c), buf, dst, ds)
        if sample:
            _place(vbuf, n, m, key, s, s + v, weighted, out)
    return bad


@cached_njit
def _decode_chunk(packed, o, nbytes, d, v, bits, mask, cents, wht8, sgn, t, kc, buf, dst,
                  ds):  # pragma: no cover - compiled
    """``dst[ds + i] = D_i * (t * (H c)_i)`` for the ``v`` values of a chunk of ``d`` whose
    labels are ``packed[o:o + nbytes]``."""
    if bits == 1 and d == 4 * _L1 and v == d:  # a full chunk: the fused passes
        _decode_full1(packed, o, wht8, sgn, t, kc, buf, dst, ds)
        return
    if bits == 1 and d >= 8:  # labels and the first three stages by table
        for grp in range(nbytes):
            r = np.int64(packed[o + grp]) * 8
            for j in range(8):
                buf[8 * grp + j] = wht8[r + j]
        _fwht_blocked(buf, d, 8)
    elif bits == 1:
        byte = np.int32(packed[o])
        for j in range(8):
            buf[j] = np.float32(2 * ((byte >> j) & 1) - 1)
        fwht(buf, d)
    else:
        for grp in range((d + 7) // 8):
            w = np.uint64(0)
            for k in range(bits):
                if bits * grp + k < nbytes:
                    w |= np.uint64(packed[o + bits * grp + k]) << np.uint64(8 * k)
            for j in range(8):
                buf[8 * grp + j] = cents[(w >> np.uint64(bits * j)) & mask]
        fwht(buf, d)
    full = v >> 3
    for w in range((full + 7) >> 3):  # dst = D (t H c), a row of 8 signs at a time
        word = _mix(kc + np.uint64(w))
        for gg in range(min(8, full - 8 * w)):
            r = np.int64((word >> np.uint64(8 * gg)) & np.uint64(255)) * 8
            o8 = 64 * w + 8 * gg
            for j in range(8):
                dst[ds + o8 + j] = (buf[o8 + j] * t) * sgn[r + j]
    if v > 8 * full:
        word = _mix(kc + np.uint64(full >> 3))
        r = np.int64((word >> np.uint64(8 * (full & 7))) & np.uint64(255)) * 8
        for j in range(v - 8 * full):
            dst[ds + 8 * full + j] = (buf[8 * full + j] * t) * sgn[r + j]


@cached_njit
def _table4(packed, o, wht8, buf, g0, g1):  # pragma: no cover - compiled
    """Label groups ``[g0, g1)`` (a multiple of 4) of a 1-bit chunk into ``buf``: each byte's
    8-point transform by table (stages 1, 2, 4), and stages 8 and 16 (the radix-4 pass of
    :func:`_fwht_from` at ``h = 8``, the same additions) before the values are stored."""
    for g in range(g0, g1, 4):
        r0 = np.int64(packed[o + g]) * 8
        r1 = np.int64(packed[o + g + 1]) * 8
        r2 = np.int64(packed[o + g + 2]) * 8
        r3 = np.int64(packed[o + g + 3]) * 8
        i = 8 * g
        for j in range(8):
            p = wht8[r0 + j]
            q = wht8[r1 + j]
            r = wht8[r2 + j]
            u = wht8[r3 + j]
            x0 = p + q
            x1 = p - q
            x2 = r + u
            x3 = r - u
            buf[i + j] = x0 + x2
            buf[i + 16 + j] = x0 - x2
            buf[i + 8 + j] = x1 + x3
            buf[i + 24 + j] = x1 - x3


@cached_njit
def _decode_full1(packed, o, wht8, sgn, t, kc, buf, dst, ds):  # pragma: no cover - compiled
    """:func:`_decode_chunk` of a full 1-bit chunk of ``4 _L1`` values in three passes: per
    ``_L1`` block (in L1) the labels by table and stages 1..2048 (:func:`_table4`,
    :func:`_fwht_from`); then stages 4096 and 8192 (radix 4, as :func:`_fwht_from`) with
    ``dst = D (t H c)`` written from the registers, each value its sign row's
    ``(z * t) * sign``."""
    gb = _L1 // 8  # groups a block
    for b in range(4):
        _table4(packed, o, wht8, buf, b * gb, (b + 1) * gb)
        _fwht_from(buf[b * _L1:(b + 1) * _L1], _L1, 32)
    h = _L1
    for w in range(h // 64):  # 64 values of each quarter: one sign word each
        w0 = _mix(kc + np.uint64(w))
        w1 = _mix(kc + np.uint64(w + h // 64))
        w2 = _mix(kc + np.uint64(w + 2 * (h // 64)))
        w3 = _mix(kc + np.uint64(w + 3 * (h // 64)))
        for gg in range(8):
            sh = np.uint64(8 * gg)
            r0 = np.int64((w0 >> sh) & np.uint64(255)) * 8
            r1 = np.int64((w1 >> sh) & np.uint64(255)) * 8
            r2 = np.int64((w2 >> sh) & np.uint64(255)) * 8
            r3 = np.int64((w3 >> sh) & np.uint64(255)) * 8
            i = 64 * w + 8 * gg
            for j in range(8):
                p = buf[i + j]
                q = buf[i + h + j]
                r = buf[i + 2 * h + j]
                u = buf[i + 3 * h + j]
                x0 = p + q
                x1 = p - q
                x2 = r + u
                x3 = r - u
                dst[ds + i + j] = ((x0 + x2) * t) * sgn[r0 + j]
                dst[ds + i + 2 * h + j] = ((x0 - x2) * t) * sgn[r2 + j]
                dst[ds + i + h + j] = ((x1 + x3) * t) * sgn[r1 + j]
                dst[ds + i + 3 * h + j] = ((x1 - x3) * t) * sgn[r3 + j]


@cached_njit
def _place(vals, n, k, key, j0, j1, weighted, out):  # pragma: no cover - compiled
    """Strata ``[j0, j1)`` of ``k`` over ``n`` values, all of their values written:
    ``vals[j - j0]`` (times the stratum's size when ``weighted``) at the stratum's position
    (:func:`_strata`), 0 at the others."""
    out[(j0 * n) // k:(j1 * n) // k] = np.float32(0.0)  # in cache for what follows
    _strata(n, k, key, j0, j1, True, weighted, vals, out)


@cached_njit
def _strata(n, k, key, j0, j1, place, weighted, src, dst):  # pragma: no cover - compiled
    """Strata ``j`` in ``[j0, j1)`` of ``k`` over ``n`` values, each of one position uniform in
    ``[floor(j n / k), floor((j+1) n / k))`` by the sampling key (the bounds stepped, not
    divided): ``dst[j - j0] = src[position]`` (the encoder's gather), or with ``place``
    ``dst[position] = src[j - j0]``, times the stratum's size (its Horvitz–Thompson weight)
    when ``weighted``. Positions are used as they are computed: no array of them."""
    ks = _mix(key ^ _SAMPLE_SALT)
    q = (j0 * n) // k
    r = (j0 * n) % k
    qn = n // k
    rn = n % k
    for j in range(j0, j1):
        q2 = q + qn
        r2 = r + rn
        if r2 >= k:
            q2 += 1
            r2 -= k
        u = _mix(ks + np.uint64(j)) >> np.uint64(32)
        p = q + np.int64((u * np.uint64(q2 - q)) >> np.uint64(32))
        if not place:
            dst[j - j0] = src[p]
        elif weighted:
            dst[p] = src[j - j0] * np.float32(q2 - q)
        else:
            dst[p] = src[j - j0]
        q = q2
        r = r2
