"""Compiled top-k kernels: the reader of a whole ``topk`` body with ``fp32`` or ``affine:b``
values (``TopK.read_flat``, below), and the encode's passes (``candidates``, ``band``,
``keep_at_least``, ``pack_bitmap``) and the dense decode's ``scatter``, each doing what the
numpy path in ``sparsify.py`` does, entry for entry (the payload bytes are tested equal).

One pass over the body bytes makes every check :meth:`~.sparsify.TopK.read_sparse` makes (kept
counts, index modes, bitmap padding and popcount, canonical gap varints within the tensor, the
gap section smaller than the bitmap, finite values — for ``affine``: the zero-point width, a
finite positive scale, the overflow bound, zero padding bits — no trailing byte) and writes the
kept positions and the values (fp32: their bit patterns; affine: decoded, as
``AffineSection.values`` decodes them) into flat arrays: no Python call per tensor. It answers
only "accepted" or "refused"; a refused body is read again by ``read_sparse``, which raises the
error naming what was wrong (and whose answer is taken if it accepts: this reader may be
stricter, never looser).
"""

from __future__ import annotations

import numpy as np

from ._jit import cached_njit, dequantize_fields, zero_point

try:  # LLVM's count-trailing-zeros instruction, as numba exposes it
    from numba.cpython.unsafe.numbers import trailing_zeros
except ImportError:  # pragma: no cover - a numba without it: the same count, portably
    @cached_njit
    def trailing_zeros(x):
        q = 0
        while not (x >> np.uint64(q)) & np.uint64(1):
            q += 1
        return q

__all__ = ["scan_topk", "candidates", "keep_at_least", "band", "pack_bitmap", "scatter"]

_EXP = np.uint32(0x7F800000)  # float32 exponent bits: all set = Inf or NaN
_ABS = np.int32(0x7FFFFFFF)  # float32 bits without the sign: |x|, ordered as |x| for finite x


def _byte_tables():
    """For every byte value: its set bits' positions (LSB first, padded with 0) and their count."""
    pos = np.zeros((256, 8), np.int64)
    cnt = np.zeros(256, np.int64)
    for byte in range(256):
        for bit in range(8):
            if byte >> bit & 1:
                pos[byte, cnt[byte]] = bit
                cnt[byte] += 1
    return pos, cnt


_BIT_POS, _BIT_CNT = _byte_tables()


@cached_njit
def _bitmap_positions(b, pos, nbm, n, k, idx, j):  # pragma: no cover - compiled
    """The set bits of the ``nbm``-byte bitmap ``b[pos:]`` (LSB-first) of ``n`` positions,
    written in order to ``idx[j:]``: how many, or -1 when a padding bit (position >= n) is set
    or there are more than ``k``. Eight positions per byte from a table, written whole while
    ``idx`` has room for them (the tail past the count is overwritten or unused)."""
    used = n - 8 * (nbm - 1)
    if nbm and used < 8 and (np.int64(b[pos + nbm - 1]) >> used) != 0:
        return -1
    room = idx.size - j
    c = 0
    for q in range(nbm):
        byte = b[pos + q]
        if byte == 0:
            continue
        cnt = _BIT_CNT[byte]
        base = 8 * q
        if c + 8 <= room:
            for s in range(8):
                idx[j + c + s] = base + _BIT_POS[byte, s]
        else:
            if c + cnt > room:
                return -1
            for s in range(cnt):
                idx[j + c + s] = base + _BIT_POS[byte, s]
        c += cnt
        if c > k:
            return -1
    return c


@cached_njit
def _uvarint(b, pos, end, limit):  # pragma: no cover - compiled
    """A canonical varint of at most 9 bytes at ``b[pos:end]`` whose value is ``<= limit``:
    ``(value, next position)``, or ``(-1, -1)`` where ``Reader.uvarint`` would raise."""
    v = np.int64(0)
    shift = 0
    start = pos
    x = np.int64(0)
    while True:
        if pos >= end:
            return -1, -1
        x = np.int64(b[pos])
        pos += 1
        v |= (x & 0x7F) << shift
        if x < 0x80:
            break
        shift += 7
        if shift >= 63:
            return -1, -1
    if pos - start > 1 and x == 0:
        return -1, -1
    if v > limit:
        return -1, -1
    return v, pos


@cached_njit
def _affine_values(b, pos, end, k, bits, limit, out):  # pragma: no cover - compiled
    """The ``affine:bits`` section of ``k`` values (one slice: zero-point width, scale, zero
    point, packed values) at ``b[pos:end]`` checked as ``Affine.read_section`` checks it and
    decoded into ``out[:k]`` (``fl(fl(u - zu) * s)``): the position after it, or -1."""
    if pos >= end:
        return -1
    zw = np.int64(b[pos])
    pos += 1
    if zw != 1 and zw != 2 and zw != 4:
        return -1
    nb = (k * bits + 7) // 8
    if 4 + zw + nb > end - pos:
        return -1
    sb = np.empty(1, np.float32)  # the scale's 4 bytes, read as a float32
    sb.view(np.uint8)[:] = b[pos:pos + 4]
    s = sb[0]
    if not (s > 0 and s < np.inf):
        return -1
    o = pos + 4
    z = zero_point(b, o, zw)
    qmin = -(1 << (bits - 1))
    qmax = (1 << (bits - 1)) - 1
    if np.float64(max(abs(qmin - z), abs(qmax - z))) * np.float64(s) > limit:
        return -1
    zu = np.float32(z - qmin)
    p = o + zw
    if nb:
        used = k * bits - 8 * (nb - 1)
        if used < 8 and (np.int64(b[p + nb - 1]) >> used) != 0:
            return -1
    dequantize_fields(b[p:p + nb], bits, 0, k, s, zu, out)
    return p + nb


@cached_njit
def scan_topk(b, pos, end, ns, twod, per_tensor, wants, total_k, idx, vals8, vals, kept,
              bits, limit):  # pragma: no cover - compiled
    """Check the topk body ``b[pos:end]`` of the tensors of ``ns`` elements (``twod[t]``: the
    tensor has two or more dimensions), its values ``fp32`` (``bits == 0``) or ``affine:bits``
    (one slice per 2-D tensor, raw float32 for 1-D ones, as ``read_sparse`` reads them, overflow
    bound ``limit``); write tensor t's ``kept[t]`` sorted positions (tensor-local) to ``idx``
    and its values to ``vals8`` (``vals`` is the same memory as uint32, native =
    little-endian: raw values' bytes copied, affine ones decoded to float32), tensor after
    tensor. Returns False where ``read_sparse`` would
    (or might) refuse the body; ``idx`` and ``vals`` hold the kept values of either
    ``wants`` (per tensor) or ``total_k`` (global)."""
    valf = vals.view(np.float32)
    got = 0
    j = 0
    for t in range(ns.size):
        n = ns[t]
        k, pos = _uvarint(b, pos, end, n)
        if pos < 0:
            return False
        if per_tensor:
            if k != wants[t]:
                return False
        else:
            got += k
            if got > total_k:
                return False
        if j + k > idx.size:
            return False
        if 0 < k < n:
            if pos >= end:
                return False
            mode = b[pos]
            pos += 1
            nbm = (n + 7) // 8
            if mode == 0:  # bitmap, LSB-first; padding bits clear; popcount = k
                if end - pos < nbm:
                    return False
                c = _bitmap_positions(b, pos, nbm, n, k, idx, j)
                if c != k:
                    return False
                pos += nbm
            elif mode == 1:  # gap varints: byte length, then k gaps filling it exactly
                start = pos
                nb, pos = _uvarint(b, pos, end, end - pos)
                if pos < 0 or (pos - start) + nb >= nbm or end - pos < nb:
                    return False
                q = pos
                stop = pos + nb
                prev = np.int64(-1)
                for c in range(k):
                    if q < stop and b[q] < 0x80:  # one-byte varint (canonical; <= n - 1?)
                        g = np.int64(b[q])
                        q += 1
                        if g > n - 1:
                            return False
                    else:
                        g, q = _uvarint(b, q, stop, n - 1)
                        if q < 0:
                            return False
                    prev += g + 1
                    if prev >= n:
                        return False
                    idx[j + c] = prev
                if q != stop:
                    return False
                pos = stop
            else:
                return False
        elif k == n:
            for c in range(k):
                idx[j + c] = c
        if bits and twod[t] and k > 0:
            pos = _affine_values(b, pos, end, k, bits, limit, valf[j:j + k])
            if pos < 0:
                return False
            kept[t] = k
            j += k
            continue
        if end - pos < 4 * k:
            return False
        src = b[pos:pos + 4 * k]
        dst = vals8[4 * j:4 * (j + k)]
        for c in range(4 * k):  # the values' bytes (little-endian float32), copied as they are
            dst[c] = src[c]
        bad = 0
        u = vals[j:j + k]
        for c in range(k):  # exponent bits all set: Inf or NaN
            bad += (u[c] & _EXP) == _EXP
        if bad:
            return False
        pos += 4 * k
        kept[t] = k
        j += k
    if not per_tensor and got != total_k:
        return False
    return pos == end


@cached_njit
def candidates(bits, t, base, idx, val):  # pragma: no cover - compiled
    """The entries with ``|x| >= t`` of the float32 values whose bit patterns are ``bits``
    (int32), ``t >= 0`` given by its bit pattern and compared as an integer (for finite values
    the order of ``|x|`` is the order of its bits): their positions plus ``base`` into ``idx``
    and their bit patterns into ``val``, in order. Returns how many; -1 when a value is NaN or
    Inf; -2 when there are more than ``idx.size``: the arrays then hold the first ``idx.size``
    of them and every value up to the last one written was checked (go on after it).

    Per block of 64 values one word of comparison bits (a loop LLVM vectorizes), then one
    step per set bit (trailing-zero count): ~4x numpy's compare + ``flatnonzero`` + ``take``
    at a tenth kept."""
    n = bits.size
    bad = np.int32(0)
    c = 0
    for w in range(n // 64):
        blk = bits[64 * w:64 * w + 64]
        word = np.uint64(0)
        for q in range(64):
            b = blk[q] & _ABS
            bad |= np.int32(b >= np.int32(0x7F800000))
            word |= np.uint64(b >= t) << np.uint64(q)
        c = _set_bits(word, blk, base + 64 * w, idx, val, c)
        if c < 0:
            return -1 if bad else -2
    blk = bits[n - n % 64:]  # the tail
    word = np.uint64(0)
    for q in range(blk.size):
        b = blk[q] & _ABS
        bad |= np.int32(b >= np.int32(0x7F800000))
        word |= np.uint64(b >= t) << np.uint64(q)
    c = _set_bits(word, blk, base + n - n % 64, idx, val, c)
    if c < 0:
        return -1 if bad else -2
    return -1 if bad else c


@cached_njit
def _set_bits(word, blk, base, idx, val, c):  # pragma: no cover - compiled
    """Append ``base + q`` and ``blk[q]`` for each set bit ``q`` of ``word`` to ``idx``/``val``
    at ``c``: the new end, or -1 when they are full."""
    while word:
        if c >= idx.size:
            return -1
        q = trailing_zeros(word)
        idx[c] = base + q
        val[c] = blk[q]
        c += 1
        word &= word - np.uint64(1)
    return c


@cached_njit
def keep_at_least(ii, vv, t, oi, ov, pos):  # pragma: no cover - compiled
    """Append the entries ``(ii[q], vv[q])`` with ``|x| >= t`` (``vv``: float32 bit patterns as
    int32, finite; ``t >= 0`` by its bit pattern) to ``oi``/``ov`` at ``pos``, in order: the
    new end. Branchless (every entry is written, the end moves past the kept ones), so ``oi``
    and ``ov`` need room for ``pos + ii.size`` entries."""
    for q in range(ii.size):
        oi[pos] = ii[q]
        ov[pos] = vv[q]
        pos += (vv[q] & _ABS) >= t
    return pos


@cached_njit
def band(vv, hi, out, nb):  # pragma: no cover - compiled
    """For the float32 bit patterns ``vv`` (int32, finite): how many have ``|x| > hi``; the
    others' ``|x|`` (bit patterns) are appended to ``out`` at ``nb`` (room for ``nb +
    vv.size``). ``(above, new end)``."""
    above = 0
    for q in range(vv.size):
        m = vv[q] & _ABS
        out[nb] = m
        nb += m <= hi
        above += m > hi
    return above, nb


@cached_njit
def pack_bitmap(idx, nbytes):  # pragma: no cover - compiled
    """The LSB-first bitmap (``nbytes`` bytes) of the positions ``idx`` (each < 8 * nbytes)."""
    out = np.zeros(nbytes, np.uint8)
    for c in range(idx.size):
        i = idx[c]
        out[i >> 3] |= np.uint8(1 << (i & 7))
    return out


@cached_njit
def scatter(idx, vals, out):  # pragma: no cover - compiled
    """``out[idx] = vals`` (``idx`` within ``out``)."""
    for c in range(idx.size):
        out[idx[c]] = vals[c]
