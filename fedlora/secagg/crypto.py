"""The cryptographic primitives, all from the maintained ``cryptography`` package: X25519 key
agreement, HKDF-SHA256 key derivation, ChaCha20 as the mask PRG, AES-256-GCM for the
encrypted shares, SHA-256 for the self-mask seed's commitment."""

from __future__ import annotations

import functools
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, \
    PublicFormat

from .errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
LABEL = b"fedlora-secagg/v1 "


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw (private, public) 32-byte strings."""
    sk = X25519PrivateKey.generate()
    return (sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def public_of(sk: bytes) -> bytes:
    if len(sk) != KEY_BYTES:
        raise SecAggError(f"a private key is {KEY_BYTES} bytes")
    return _private(sk).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


@functools.lru_cache(maxsize=256)
def _private(sk: bytes) -> X25519PrivateKey:
    """The key object of a raw private key (parsed once: a node agrees keys with every
    neighbour, the server with every neighbour of a dropped node)."""
    return X25519PrivateKey.from_private_bytes(sk)


def agree(sk: bytes, pk: bytes, session: bytes, purpose: bytes, a: int, b: int) -> bytes:
    """A 32-byte key both ends of the pair (a, b) derive: HKDF-SHA256 of the X25519 shared
    secret, salted with the round's session id, labelled with the purpose and the pair (in
    increasing order, so both ends label it alike). A malformed public key is a SecAggError."""
    try:
        shared = _private(sk).exchange(
            X25519PublicKey.from_public_bytes(pk))
    except ValueError as err:  # wrong length, or a low-order point (all-zero secret)
        raise SecAggError(f"bad public key: {err}") from None
    lo, hi = min(a, b), max(a, b)
    info = LABEL + purpose + lo.to_bytes(4, "big") + hi.to_bytes(4, "big")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=info).derive(shared)


def prg(seed: bytes, count: int, ring_bits: int) -> np.ndarray:
    """``count`` pseudo-random elements of Z_(2^ring_bits) (uint64) expanded from a 32-byte
    seed with ChaCha20 (zero nonce: every seed is used for one expansion only)."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    out = np.frombuffer(enc.update(bytes(8 * count)), dtype="<u8").copy()
    out &= np.uint64((1 << ring_bits) - 1)
    return out


def commit(session: bytes, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed (the server checks a reconstructed seed with it;
    a 256-bit random seed is not revealed by its hash)."""
    h = hashes.Hash(hashes.SHA256())
    h.update(LABEL + b"commit" + session + seed)
    return h.finalize()


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError("a share's ciphertext does not authenticate (tampered, or not for "
                          "this node and round)") from None
