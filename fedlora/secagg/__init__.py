"""Secure aggregation (SecAgg+) of quantized updates, without Flower: the server learns only the
sum. :mod:`.protocol` (the node's and the server's state machines), :mod:`.ring` (stochastic
rounding, Z_(2^k), k-bit packing), :mod:`.messages` (byte formats, strict decoders),
:mod:`.shamir` (t-of-m sharing), :mod:`.crypto` (``cryptography``: X25519, HKDF, ChaCha20,
AES-GCM). See docs/secure-aggregation.md."""

from .errors import RecoveryError, SecAggError
from .protocol import (ClientSession, Params, ServerSession, auto_degree, auto_threshold,
                       coordinate_set, neighbours, skellam)

__all__ = ["ClientSession", "Params", "RecoveryError", "SecAggError", "ServerSession",
           "auto_degree", "auto_threshold", "coordinate_set", "neighbours", "skellam"]
