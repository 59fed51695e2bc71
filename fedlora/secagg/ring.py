"""Integers on the wire: stochastic rounding on a server-fixed scale, arithmetic in
Z_(2^k) (numpy ``uint64``, which wraps mod 2^64, then masked to k bits), and k-bit packing.

With ``bits`` quantization bits a coordinate becomes an integer in [−L, L], L = 2^(bits−1) − 1,
on the scale s = L / C that the clip bound C fixes (|x_i| ≤ ‖x‖₂ ≤ C, so no coordinate is
clipped). A sum of n such integers lies in [−nL, nL]; k = bits + ⌈log2 n⌉ + margin bits hold it
without wrapping, so the sum read back as a centred residue is exact."""

from __future__ import annotations

import math

import numpy as np

from .errors import SecAggError

MAX_RING_BITS = 62
MARGIN_BITS = 1


def levels(bits: int) -> int:
    """L: the largest quantized magnitude at ``bits`` bits."""
    return (1 << (bits - 1)) - 1


def ring_bits(bits: int, n: int, extra: int = 0) -> int:
    """k = bits + ⌈log2 n⌉ + margin (+ ``extra`` bits of headroom, e.g. for distributed noise)."""
    k = bits + max(1, math.ceil(math.log2(max(n, 2)))) + MARGIN_BITS + extra
    if k > MAX_RING_BITS:
        raise SecAggError(f"a ring of {k} bits is over {MAX_RING_BITS}: fewer bits or nodes")
    return k


def scale(bits: int, clip: float) -> float:
    return levels(bits) / float(clip)


def quantize(x: np.ndarray, bits: int, clip: float, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of ``x · s`` (unbiased: E[q] = x · s) to int64 in [−L, L]; ``x`` must
    be clipped to L2 norm ``clip`` already (values past ±clip are clamped, never wrapped)."""
    lv = levels(bits)
    y = np.clip(np.asarray(x, np.float64).reshape(-1) * scale(bits, clip), -lv, lv)
    q = np.floor(y + rng.random(y.shape))
    return np.clip(q, -lv, lv).astype(np.int64)


def to_ring(q: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(q, np.int64).astype(np.uint64) & np.uint64((1 << k) - 1)


def centred(r: np.ndarray, k: int) -> np.ndarray:
    """Residues mod 2^k → signed integers in [−2^(k−1), 2^(k−1))."""
    r = np.asarray(r, np.uint64) & np.uint64((1 << k) - 1)
    s = r.astype(np.int64)
    s[s >= (1 << (k - 1))] -= (1 << k)
    return s


def packed_len(count: int, k: int) -> int:
    return (count * k + 7) // 8


def pack(r: np.ndarray, k: int) -> bytes:
    """Elements of Z_(2^k) → ``ceil(count·k/8)`` bytes, LSB first."""
    r = np.ascontiguousarray(r, dtype="<u8").reshape(-1)
    bits = np.unpackbits(r.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :k]
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes, count: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack`; refuses a wrong length or set padding bits."""
    if len(data) != packed_len(count, k):
        raise SecAggError(f"masked input of {len(data)} bytes, expected "
                          f"{packed_len(count, k)} ({count} coordinates × {k} bits)")
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    if bits[count * k:].any():
        raise SecAggError("masked input has set padding bits")
    full = np.zeros((count, 64), np.uint8)
    full[:, :k] = bits[:count * k].reshape(count, k)
    return np.packbits(full, axis=1, bitorder="little").view("<u8").reshape(-1).astype(np.uint64)
