"""Byte formats of the protocol's messages, with strict decoders: every decoder checks the exact
length, counts, index ranges and duplicates, and raises :class:`SecAggError` (never anything
else) on input it does not accept — a node's or the server's bytes are hostile input. The
formats (big-endian integers, ``u32`` node indices 0..n−1): docs/secure-aggregation.md
("Message formats").
"""

from __future__ import annotations

import struct

from .crypto import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from .errors import SecAggError
from .shamir import SHARE_BYTES

PLAIN_BYTES = 8 + 2 * SHARE_BYTES
CT_BYTES = NONCE_BYTES + PLAIN_BYTES + TAG_BYTES
ADVERTISE_BYTES = 3 * KEY_BYTES
KIND_SEED, KIND_KEY = 0, 1


def _u32(x: int) -> bytes:
    return int(x).to_bytes(4, "big")


def _table(data: bytes, width: int, what: str, n: int) -> list[tuple[int, bytes]]:
    """``count:u32`` then ``count`` rows of ``u32 index`` + ``width`` bytes; indices < n, distinct."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 4:
        raise SecAggError(f"{what}: too short")
    count = int.from_bytes(data[:4], "big")
    row = 4 + width
    if count > n or len(data) != 4 + count * row:
        raise SecAggError(f"{what}: {len(data)} bytes do not hold {count} rows of {row}")
    rows, seen = [], set()
    for r in range(count):
        off = 4 + r * row
        idx = int.from_bytes(data[off:off + 4], "big")
        if idx >= n or idx in seen:
            raise SecAggError(f"{what}: index {idx} out of range or repeated")
        seen.add(idx)
        rows.append((idx, bytes(data[off + 4:off + row])))
    return rows


def _encode_table(rows: list[tuple[int, bytes]]) -> bytes:
    return _u32(len(rows)) + b"".join(_u32(i) + bytes(v) for i, v in rows)


def encode_advertise(c_pk: bytes, s_pk: bytes, commit: bytes) -> bytes:
    return c_pk + s_pk + commit


def decode_advertise(data: bytes) -> tuple[bytes, bytes, bytes]:
    if not isinstance(data, (bytes, bytearray)) or len(data) != ADVERTISE_BYTES:
        raise SecAggError(f"advertised keys: {ADVERTISE_BYTES} bytes expected")
    d = bytes(data)
    return d[:32], d[32:64], d[64:96]


def encode_keys(peers: dict[int, tuple[bytes, bytes]]) -> bytes:
    return _encode_table([(j, c + s) for j, (c, s) in sorted(peers.items())])


def decode_keys(data: bytes, n: int) -> dict[int, tuple[bytes, bytes]]:
    return {j: (v[:32], v[32:]) for j, v in _table(data, 2 * KEY_BYTES, "neighbour keys", n)}


def encode_cts(cts: dict[int, bytes]) -> bytes:
    return _encode_table(sorted(cts.items()))


def decode_cts(data: bytes, n: int, what: str = "shares") -> dict[int, bytes]:
    return dict(_table(data, CT_BYTES, what, n))


def encode_unmask(survivors: list[int], dropped: list[int]) -> bytes:
    return (_u32(len(survivors)) + b"".join(map(_u32, survivors))
            + _u32(len(dropped)) + b"".join(map(_u32, dropped)))


def decode_unmask(data: bytes, n: int) -> tuple[list[int], list[int]]:
    if not isinstance(data, (bytes, bytearray)) or len(data) < 8:
        raise SecAggError("unmask request: too short")
    a = int.from_bytes(data[:4], "big")
    if a > n or len(data) < 8 + 4 * a:
        raise SecAggError("unmask request: truncated survivor list")
    b = int.from_bytes(data[4 + 4 * a:8 + 4 * a], "big")
    if b > n or len(data) != 8 + 4 * (a + b):
        raise SecAggError("unmask request: wrong length")
    vals = struct.unpack(f">{a}I", data[4:4 + 4 * a]), struct.unpack(f">{b}I", data[8 + 4 * a:])
    surv, drop = list(vals[0]), list(vals[1])
    if any(i >= n for i in surv + drop) or len(set(surv + drop)) != a + b:
        raise SecAggError("unmask request: an index out of range, repeated, or both survived "
                          "and dropped")
    return surv, drop


def encode_reveal(rows: list[tuple[int, int, bytes]]) -> bytes:
    return _encode_table([(i, bytes([kind]) + s) for i, kind, s in rows])


def decode_reveal(data: bytes, n: int) -> list[tuple[int, int, bytes]]:
    out = []
    for i, v in _table(data, 1 + SHARE_BYTES, "revealed shares", n):
        if v[0] not in (KIND_SEED, KIND_KEY):
            raise SecAggError(f"revealed shares: unknown kind {v[0]}")
        out.append((i, v[0], v[1:]))
    return out


def encode_bitmap(bits) -> bytes:
    """A 0/1 vector → ``ceil(len/8)`` bytes, LSB first, padding bits zero."""
    import numpy as np

    return np.packbits(np.asarray(bits, dtype=bool), bitorder="little").tobytes()


def decode_bitmap(data: bytes, count: int, what: str = "announced slices"):
    """Inverse of :func:`encode_bitmap` (bool array of ``count``); refuses a wrong length or
    set padding bits."""
    import numpy as np

    if not isinstance(data, (bytes, bytearray)) or len(data) != (count + 7) // 8:
        raise SecAggError(f"{what}: {(count + 7) // 8} bytes expected for {count} bits")
    bits = np.unpackbits(np.frombuffer(bytes(data), np.uint8), bitorder="little")
    if bits[count:].any():
        raise SecAggError(f"{what}: padding bits set")
    return bits[:count].astype(bool)


def encode_values(bitmap: bytes, routed: bytes) -> bytes:
    """The values request of a rank-union round: the announced slice bitmap, then the routed
    shares of the values session."""
    return len(bitmap).to_bytes(4, "big") + bitmap + routed


def decode_values(data: bytes, count: int, n: int):
    """(bool array of ``count`` announced slices, routed-shares bytes checked as
    :func:`decode_cts`)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 4:
        raise SecAggError("values request: too short")
    size = int.from_bytes(data[:4], "big")
    if size != (count + 7) // 8 or len(data) < 4 + size:
        raise SecAggError("values request: wrong bitmap length")
    bitmap, routed = bytes(data[4:4 + size]), bytes(data[4 + size:])
    decode_cts(routed, n, "routed shares")
    return decode_bitmap(bitmap, count), routed
