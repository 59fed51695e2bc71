"""The compiled reader of a whole ``topk`` body with ``fp32`` or ``affine:b`` values
(``TopK.read_flat``).

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

from ._jit import cached_njit, zero_point

__all__ = ["scan_topk", "at_least"]

_EXP = np.uint32(0x7F800000)  # float32 exponent bits: all set = Inf or NaN


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
    mask = (1 << bits) - 1
    for c in range(k):
        q = c * bits
        j = p + (q >> 3)
        sh = q & 7
        v = np.int64(b[j])
        if sh + bits > 8:
            v |= np.int64(b[j + 1]) << 8
        out[c] = (np.float32((v >> sh) & mask) - zu) * s
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
                c = 0
                for q in range(nbm):
                    byte = np.int64(b[pos + q])
                    if byte == 0:
                        continue
                    for bit in range(8):
                        if (byte >> bit) & 1:
                            i = 8 * q + bit
                            if i >= n or c >= k:
                                return False
                            idx[j + c] = i
                            c += 1
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
def at_least(bits, t, mask):  # pragma: no cover - compiled
    """``mask[i] = |x_i| >= t`` for the float32 values whose bit patterns are ``bits`` (int32)
    and a threshold ``t >= 0`` given by its bit pattern, compared as integers (for finite
    values the order of ``|x|`` is the order of its bits): one pass LLVM vectorizes, where numpy
    makes three (abs, max for the NaN/Inf check, compare). Returns whether any value was NaN or
    Inf (its mask entry is then meaningless)."""
    bad = np.int32(0)
    for i in range(bits.size):
        b = bits[i] & np.int32(0x7FFFFFFF)
        bad |= np.int32(b >= np.int32(0x7F800000))
        mask[i] = b >= t
    return bad != 0
