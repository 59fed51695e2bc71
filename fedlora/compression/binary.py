"""Bit-level wire formats: LEB128 varints, index bitmaps, ``b``-bit packing, and :class:`Reader`,
the bounds-checked reader every decoder reads through.

Varint format (one format, two implementations that the tests check against each other): unsigned
LEB128, 7 bits per byte, least significant group first, the high bit set on every byte but the
last. A decoder accepts only canonical varints: at most :data:`MAX_VARINT_BYTES` (9) bytes, so
values are ``< 2**63``, and no redundant trailing zero byte. The scalar form (:func:`uvarint`,
:func:`uvarint_len`, :meth:`Reader.uvarint`) writes and reads header fields and counts; the
vectorised form (:func:`leb128_encode`, :func:`leb128_size`, :func:`leb128_decode`) writes and reads
a whole array of top-k index gaps at once.

Bitmaps (:func:`pack_bitmap`, :func:`unpack_bitmap`): ``ceil(n/8)`` bytes, bit ``i`` (LSB-first)
set iff index ``i`` is in the set, unused bits of the last byte zero. ``b``-bit packing
(:func:`pack_bits`, :func:`unpack_bits`): value ``i`` occupies bits ``[i*b, (i+1)*b)`` of the
little-endian bit stream, ``ceil(n*b/8)`` bytes.
"""

from __future__ import annotations

import numpy as np

from .errors import CodecError

__all__ = ["MAX_VARINT_BYTES", "uvarint", "uvarint_len", "leb128_encode", "leb128_size",
           "leb128_decode", "Reader", "pack_bitmap", "unpack_bitmask", "unpack_bitmap",
           "packed_len", "pack_bits", "unpack_bits"]

MAX_VARINT_BYTES = 9
_VARINT_LIMIT = 1 << (7 * MAX_VARINT_BYTES)  # = 2**63: every int64 >= 0 fits


# --------------------------------------------------------------------------------------------
# varints, one value at a time


def uvarint(n: int) -> bytes:
    """Unsigned LEB128 encoding of ``0 <= n < 2**63``."""
    if not 0 <= n < _VARINT_LIMIT:
        raise ValueError(f"uvarint of {n} is out of range [0, 2**63)")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def uvarint_len(n: int) -> int:
    """Length in bytes of :func:`uvarint` ``(n)``."""
    return max(1, (int(n).bit_length() + 6) // 7)


# --------------------------------------------------------------------------------------------
# varints, a whole int64 array at a time


def _varint_nbytes(g: np.ndarray) -> np.ndarray:
    """Per value of ``g``: the length of its varint (the vector form of :func:`uvarint_len`)."""
    nb = np.ones(g.size, np.int64)
    if g.size == 0:
        return nb
    top = int(g.max())
    level = 7
    while top >> level:
        nb += g >= (1 << level)
        level += 7
    return nb


def leb128_size(g: np.ndarray) -> int:
    """Total bytes of the varints of the non-negative int64 array ``g``."""
    g = np.asarray(g, dtype=np.int64)
    if g.size == 0 or int(g.max()) < 128:
        return int(g.size)
    big = g[g >= 128]
    return int(g.size + (_varint_nbytes(big) - 1).sum())


def leb128_encode(g: np.ndarray) -> np.ndarray:
    """The varints of the non-negative int64 array ``g``, concatenated (uint8 array).

    Fast when most values are < 128 (dense top-k gaps): one byte per value in one pass, then the
    few multi-byte values get their continuation bytes inserted."""
    g = np.asarray(g, dtype=np.int64)
    if g.size and int(g.min()) < 0:
        raise ValueError("leb128_encode of a negative number")
    out = g.astype(np.uint8)
    if g.size == 0 or int(g.max()) < 128:
        return out
    big = np.flatnonzero(g >= 128)
    gb = g[big]
    out[big] = (gb & 0x7F) | 0x80
    nb = _varint_nbytes(gb)
    rep = nb - 1
    first = np.cumsum(rep) - rep
    j = np.arange(int(rep.sum()), dtype=np.int64) - np.repeat(first, rep) + 1  # byte no. >= 1
    gv = np.repeat(gb, rep)
    last = j == np.repeat(nb, rep) - 1
    extra = ((gv >> (7 * j)) & 0x7F) | np.where(last, 0, 0x80)
    return np.insert(out, np.repeat(big + 1, rep), extra.astype(np.uint8))


def leb128_decode(buf: np.ndarray, count: int, limit: int, what: str) -> np.ndarray:
    """Decode exactly ``count`` canonical varints filling ``buf``; each must be ``<= limit``.

    Accepts and rejects exactly what ``count`` calls of :meth:`Reader.uvarint` followed by
    :meth:`Reader.done` would (CodecError)."""
    b = np.asarray(buf, dtype=np.uint8)
    if count == 0:
        if b.size:
            raise CodecError(f"{what}: {b.size} bytes for zero varints")
        return np.zeros(0, np.int64)
    if b.size < count or b.size > MAX_VARINT_BYTES * count:
        raise CodecError(f"{what}: {b.size} bytes cannot hold {count} varints")
    if b[-1] >= 0x80:
        raise CodecError(f"{what}: truncated varint")
    cont = np.flatnonzero(b >= 0x80)
    if b.size - cont.size != count:
        raise CodecError(f"{what}: {b.size - cont.size} varints, expected {count}")
    if cont.size == 0:
        vals = b.astype(np.int64)
    else:
        # runs of continuation bytes; each run plus the byte after it is one multi-byte varint
        brk = np.flatnonzero(np.diff(cont) != 1)
        rs = np.concatenate([[0], brk + 1])
        re_ = np.concatenate([brk, [cont.size - 1]])
        start = cont[rs]
        term = cont[re_] + 1
        lens = term - start + 1
        if int(lens.max()) > MAX_VARINT_BYTES:
            raise CodecError(f"{what}: varint longer than {MAX_VARINT_BYTES} bytes")
        if (b[term] == 0).any():
            raise CodecError(f"{what}: non-canonical varint (redundant zero byte)")
        run = np.repeat(np.arange(rs.size), re_ - rs + 1)
        contrib = (b[cont] & 0x7F).astype(np.int64) << (7 * (cont - start[run]))
        acc = np.add.reduceat(contrib, rs)
        acc |= b[term].astype(np.int64) << (7 * (lens - 1))
        keep = np.ones(b.size, np.bool_)
        keep[cont] = False
        vals = b[keep].astype(np.int64)
        vals[term - (re_ + 1)] = acc
    if int(vals.max()) > limit:
        raise CodecError(f"{what}: value {int(vals.max())} out of range (max {limit})")
    return vals


# --------------------------------------------------------------------------------------------
# the bounds-checked reader


class Reader:
    """Sequential reader over a bytes-like object; every read is bounds-checked (CodecError)."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf):
        self.buf = memoryview(buf).cast("B")
        self.pos = 0
        self.end = len(self.buf)

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.end - self.pos:
            raise CodecError(f"truncated payload: {what} needs {n} bytes, "
                             f"{self.end - self.pos} left")
        mv = self.buf[self.pos:self.pos + n]
        self.pos += n
        return mv

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def uvarint(self, what: str, limit: int) -> int:
        """Read a canonical varint (see the module docstring) whose value is ``<= limit``."""
        v = 0
        shift = 0
        start = self.pos
        while True:
            if self.pos >= self.end:
                raise CodecError(f"truncated payload: varint {what}")
            b = self.buf[self.pos]
            self.pos += 1
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift >= 7 * MAX_VARINT_BYTES:
                raise CodecError(f"varint {what} is longer than {MAX_VARINT_BYTES} bytes")
        if self.pos - start > 1 and b == 0:
            raise CodecError(f"varint {what} is not canonical (redundant zero byte)")
        if v > limit:
            raise CodecError(f"{what} = {v} exceeds the limit {limit}")
        return v

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        """A read-only little-endian array view of ``count`` items (bounds-checked)."""
        dt = np.dtype(dtype)
        mv = self.take(count * dt.itemsize, what)
        return np.frombuffer(mv, dtype=dt, count=count)

    def done(self, what: str = "payload") -> None:
        if self.pos != self.end:
            raise CodecError(f"{self.end - self.pos} trailing byte(s) after the {what}")


# --------------------------------------------------------------------------------------------
# index bitmaps (top-k indices, kept LoRA ranks)


def pack_bitmap(idx: np.ndarray, n: int) -> np.ndarray:
    """The bitmap of the index set ``idx`` (values in ``[0, n)``)."""
    mask = np.zeros(n, np.bool_)
    mask[idx] = True
    return np.packbits(mask, bitorder="little")


def unpack_bitmask(p: np.ndarray, n: int, what: str) -> np.ndarray:
    """Bitmap bytes -> ``bool[n]`` membership mask; rejects set padding bits."""
    used = n - 8 * (p.size - 1)
    if p.size and used < 8 and int(p[-1]) >> used:
        raise CodecError(f"{what}: padding bits set in bitmap")
    return np.unpackbits(p, count=n, bitorder="little").view(np.bool_)  # 0/1: valid bools


def unpack_bitmap(p: np.ndarray, n: int, what: str) -> np.ndarray:
    """Bitmap bytes -> sorted kept indices; rejects set padding bits."""
    # (numpy's nonzero is several times faster on bool than on uint8)
    return np.flatnonzero(unpack_bitmask(p, n, what))


# --------------------------------------------------------------------------------------------
# b-bit packing (affine:b)

def packed_len(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``uint8`` values ``< 2**bits`` into ``ceil(n*bits/8)`` bytes (LSB-first)."""
    u = np.ascontiguousarray(u, dtype=np.uint8).reshape(-1)
    n = u.size
    nb = packed_len(n, bits)
    if bits == 8:
        return u
    if bits == 1:
        return np.packbits(u, bitorder="little")
    per = {4: 2, 2: 4}.get(bits, 8)
    if n % per:
        u = np.concatenate([u, np.zeros(per - n % per, np.uint8)])
    if bits == 4:
        v = u.view("<u2")
        w = v | (v >> 4)
        return w.astype(np.uint8)[:nb]
    if bits == 2:
        v = u.view("<u4")
        w = v | (v >> 6)
        w |= v >> 12
        w |= v >> 18
        return w.astype(np.uint8)[:nb]
    v = u.view("<u8")
    w = v & np.uint64(0xFF)
    for j in range(1, 8):
        w |= ((v >> np.uint64(8 * j)) & np.uint64(0xFF)) << np.uint64(bits * j)
    return w.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)[:nb]


def unpack_bits(p: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (``p`` holds exactly ``ceil(n*bits/8)`` bytes)."""
    p = np.asarray(p, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return p[:n]
    if bits == 1:
        return np.unpackbits(p, count=n, bitorder="little")
    if bits == 4:
        v = p.astype("<u2")
        w = (v & 0x0F) | ((v & 0xF0) << 4)
        return w.view(np.uint8)[:n]
    if bits == 2:
        v = p.astype("<u4")
        w = (v & 0x03) | ((v & 0x0C) << 6)
        w |= (v & 0x30) << 12
        w |= (v & 0xC0) << 18
        return w.view(np.uint8)[:n]
    rows = -(-p.size // bits)
    buf = np.zeros((rows, 8), np.uint8)
    flat = np.zeros(rows * bits, np.uint8)
    flat[: p.size] = p
    buf[:, :bits] = flat.reshape(rows, bits)
    v = buf.view("<u8").reshape(-1)
    out = np.empty((rows, 8), np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for j in range(8):
        out[:, j] = (v >> np.uint64(bits * j)) & mask
    return out.reshape(-1)[:n]

