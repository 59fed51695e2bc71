"""Shamir t-of-m secret sharing over the prime field GF(2^521 − 1), as plain polynomial
arithmetic (no cryptographic primitive here: the randomness is :mod:`secrets`).

A secret is a 32-byte string (an X25519 private key or a mask seed), read as an integer below
2^256 < p. Share ``x`` of a polynomial ``f`` of degree ``t − 1`` with ``f(0) = secret`` is
``f(x)``; any ``t`` shares give ``f(0)`` back by Lagrange interpolation, fewer reveal nothing.
Holders are named by ``x = index + 1`` (never 0)."""

from __future__ import annotations

import secrets
from typing import Iterable, Sequence

from .errors import RecoveryError, SecAggError

P = (1 << 521) - 1  # a Mersenne prime
SHARE_BYTES = 66    # ceil(521 / 8)
SECRET_BYTES = 32


def split(secret: bytes, t: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of ``secret`` (32 bytes) for the holders ``xs`` (distinct, 1 ≤ x < p), any ``t``
    of which reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= t <= len(xs) or len(set(xs)) != len(xs) or any(not 0 < x < P for x in xs):
        raise SecAggError(f"cannot split {t}-of-{len(xs)} over holders {list(xs)[:8]}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(P) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % P
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def share_value(share: bytes) -> int:
    """A share's field element; raises :class:`SecAggError` on a malformed one."""
    if len(share) != SHARE_BYTES:
        raise SecAggError(f"a share is {SHARE_BYTES} bytes, got {len(share)}")
    y = int.from_bytes(share, "big")
    if y >= P:
        raise SecAggError("a share is not a field element (>= p)")
    return y


def combine(shares: Iterable[tuple[int, bytes]], t: int) -> bytes:
    """The secret from ``t`` of ``shares`` (``(x, share)`` pairs, the first ``t`` used);
    :class:`RecoveryError` when there are fewer than ``t`` or the result is not a 32-byte
    secret (a wrong share)."""
    pts = [(int(x), share_value(s)) for x, s in shares][:t]
    if len(pts) < t:
        raise RecoveryError(f"{len(pts)} shares, {t} needed")
    if len({x for x, _ in pts}) != len(pts):
        raise SecAggError("two shares from one holder")
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % P
                den = den * (xi - xj) % P
        secret = (secret + yi * num * pow(den, -1, P)) % P
    if secret >> (8 * SECRET_BYTES):
        raise RecoveryError("the shares do not interpolate to a 32-byte secret (a bad share)")
    return secret.to_bytes(SECRET_BYTES, "big")
