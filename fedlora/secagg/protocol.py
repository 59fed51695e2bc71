"""SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020's k-regular neighbour graph) on integers in
Z_(2^k): one node's state (:class:`ClientSession`) and the server's (:class:`ServerSession`),
with no transport — the caller moves the bytes (:mod:`fedlora.strategies.secure` over Flower's
Message API; tests and ``benchmarks/secagg.py`` in one process).

Four stages a round — advertise (keys and a commitment to the self-mask seed), share keys
(Shamir t-of-m shares of s_sk and the seed, AES-GCM-sealed to each neighbour), masked input
(y = q + PRG(b) ± pairwise PRGs mod 2^k) and unmask (shares of survivors' seeds and of the
dropped nodes' s_sk) — with who takes part after each, and what an honest-but-curious server
sees: docs/secure-aggregation.md ("The protocol core").
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import random
import struct
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from . import crypto, messages as m, ring, shamir
from .errors import RecoveryError, SecAggError

_PARAMS = struct.Struct(">16sIIIBBdQQdI")
MAX_NODES = 1 << 20
MAX_DIM = 1 << 31


@dataclass(frozen=True)
class Params:
    """One round's protocol parameters, fixed by the server and sent to every node."""

    session: bytes      # 16 random bytes, fresh each round (salts every derived key)
    n: int              # nodes invited (indices 0..n−1)
    degree: int         # neighbours per node (n − 1: everybody)
    threshold: int      # t: shares needed to reconstruct (of degree + 1 holders)
    bits: int           # quantization bits
    ring_bits: int      # k
    clip: float         # L2 clip bound C; the scale is (2^(bits−1) − 1)/C
    dim: int            # coordinates masked (the round's coordinate set)
    graph_seed: int
    noise_var: float = 0.0  # distributed DP: variance of each node's integer noise (Skellam)
    weight_cap: int = 0     # W > 0: weighted mean; the last of the dim coordinates is the node's
    #                         weight in [0, W] (W <= L, so it sums like any other coordinate)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        def bad(what: str) -> SecAggError:
            return SecAggError(f"secure-aggregation parameters: {what}")
        if not isinstance(self.session, bytes) or len(self.session) != 16:
            raise bad("session id must be 16 bytes")
        if not 2 <= self.n <= MAX_NODES:
            raise bad(f"n={self.n} outside [2, {MAX_NODES}]")
        if not 1 <= self.degree <= self.n - 1 or (self.degree < self.n - 1 and self.degree % 2):
            raise bad(f"degree {self.degree} must be even in [2, n−1) or n−1 = {self.n - 1}")
        if not 2 <= self.threshold <= self.degree + 1:
            raise bad(f"threshold {self.threshold} outside [2, degree+1 = {self.degree + 1}]")
        if not 2 <= self.bits <= 32:
            raise bad(f"bits {self.bits} outside [2, 32]")
        if not ring.ring_bits(self.bits, self.n) <= self.ring_bits <= ring.MAX_RING_BITS:
            raise bad(f"ring bits {self.ring_bits} cannot hold the sum of {self.n} "
                      f"{self.bits}-bit values (>= {ring.ring_bits(self.bits, self.n)}, <= 62)")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise bad(f"clip {self.clip} must be finite and > 0")
        if not 1 <= self.dim <= MAX_DIM:
            raise bad(f"dim {self.dim} outside [1, 2^31]")
        if not (math.isfinite(self.noise_var) and self.noise_var >= 0):
            raise bad(f"noise variance {self.noise_var} must be finite and >= 0")
        if not 0 <= self.graph_seed < 1 << 64:
            raise bad("graph seed outside [0, 2^64)")
        if not 0 <= self.weight_cap <= ring.levels(self.bits):
            raise bad(f"weight cap {self.weight_cap} outside [0, L = {ring.levels(self.bits)}]: "
                      "the weight travels as one coordinate in [-L, L]")
        if self.weight_cap and self.dim < 2:
            raise bad("a weighted round needs >= 2 coordinates (values + the weight)")
        if self.weight_cap and self.noise_var > 0:
            raise bad("a weighted round carries no distributed noise (the weight sum would be "
                      "noised)")

    def to_bytes(self) -> bytes:
        return _PARAMS.pack(self.session, self.n, self.degree, self.threshold, self.bits,
                            self.ring_bits, self.clip, self.dim, self.graph_seed, self.noise_var,
                            self.weight_cap)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Params":
        if not isinstance(data, (bytes, bytearray)) or len(data) != _PARAMS.size:
            raise SecAggError(f"secure-aggregation parameters: {_PARAMS.size} bytes expected")
        return cls(*_PARAMS.unpack(bytes(data)))

    @property
    def scale(self) -> float:
        return ring.scale(self.bits, self.clip)

    def neighbours(self, i: int) -> list[int]:
        return neighbours(self.n, self.degree, self.graph_seed, i)

    def holders(self, i: int) -> list[int]:
        """Who may hold shares of node i's secrets: i and its neighbours."""
        return sorted([*self.neighbours(i), i])


def auto_degree(n: int) -> int:
    """SecAgg+'s O(log n) neighbours: 2⌈log2 n⌉ + 2 (even), everybody when that is ≥ n − 1."""
    d = 2 * math.ceil(math.log2(max(n, 2))) + 2
    return n - 1 if d >= n - 1 else d


def auto_threshold(degree: int, fraction: float) -> int:
    """t = ⌊fraction·(degree + 1)⌋ + 1 capped at degree + 1, at least 2 (fraction 0.5: a strict
    majority of the holders, so two disjoint sets of t holders never exist)."""
    return max(2, min(degree + 1, int(math.floor(fraction * (degree + 1))) + 1))


@functools.lru_cache(maxsize=8)
def _ring_order(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    pos = np.empty(n, np.int64)
    pos[perm] = np.arange(n)
    return perm, pos


def neighbours(n: int, degree: int, seed: int, i: int) -> list[int]:
    """Node i's neighbours in the k-regular graph of the round: a circulant (Harary) graph on
    the node order a generator seeded with ``seed`` draws — each node is joined to the
    degree/2 nodes either side of it — or the complete graph when degree = n − 1."""
    if not 0 <= i < n:
        raise SecAggError(f"node index {i} outside [0, {n})")
    if degree >= n - 1:
        return [j for j in range(n) if j != i]
    perm, pos = _ring_order(n, seed)
    p, h = int(pos[i]), degree // 2
    return sorted(int(perm[(p + d) % n]) for d in itertools.chain(range(1, h + 1),
                                                                    range(-h, 0)))


def coordinate_set(total: int, density: float, seed: int) -> np.ndarray:
    """The round's coordinates (sorted, int64): all of them at density 1, else a uniform
    ⌈density·total⌉-subset drawn from ``seed`` — one set for every node, known to all, so the
    masks of a sparse upload still cancel and the server learns nothing per node."""
    if density >= 1.0:
        return np.arange(total, dtype=np.int64)
    m_ = max(1, math.ceil(density * total))
    return np.sort(np.random.default_rng(seed).choice(total, m_, replace=False)).astype(np.int64)


def _pair_sign(me: int, other: int) -> int:
    return 1 if me < other else -1


def _mask_seed(sk: bytes, pk: bytes, p: Params, a: int, b: int) -> bytes:
    return crypto.agree(sk, pk, p.session, b"mask", a, b)


def _share_key(sk: bytes, pk: bytes, p: Params, a: int, b: int) -> bytes:
    return crypto.agree(sk, pk, p.session, b"share", a, b)


def _aad(p: Params, src: int, dst: int) -> bytes:
    return p.session + src.to_bytes(4, "big") + dst.to_bytes(4, "big")


def skellam(var: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """Skellam noise of variance ``var``: Poisson(var/2) − Poisson(var/2) (int64); its sum
    over nodes is Skellam with the summed variance (Agarwal et al. 2021)."""
    if var <= 0:
        return np.zeros(count, np.int64)
    return rng.poisson(var / 2, count).astype(np.int64) - rng.poisson(var / 2, count)


# =============================================================================== node


@dataclass
class ClientSession:
    """One node's side of one round. ``stage`` moves advertised → shared → masked → done; each
    step runs once, in order (a repeated or out-of-order request is a SecAggError)."""

    params: Params
    index: int
    c_sk: bytes = b""
    s_sk: bytes = b""
    seed: bytes = b""
    stage: str = "new"
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    own: tuple[bytes, bytes] = (b"", b"")  # my shares of my own (s_sk, b)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # i → (s_sk, b) shares

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.params.n:
            raise SecAggError(f"node index {self.index} outside [0, {self.params.n})")
        if not self.c_sk:
            self.c_sk, _ = crypto.new_keypair()
            self.s_sk, _ = crypto.new_keypair()
            self.seed = os.urandom(32)

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"request out of order: node is at stage {self.stage!r}, "
                              f"expected {stage!r}")

    def advertise(self) -> bytes:
        self._expect("new")
        self.stage = "advertised"
        return m.encode_advertise(crypto.public_of(self.c_sk), crypto.public_of(self.s_sk),
                                  crypto.commit(self.params.session, self.seed))

    def share_keys(self, data: bytes) -> bytes:
        """Neighbours' keys in, encrypted shares of (s_sk, b) out."""
        self._expect("advertised")
        p, me = self.params, self.index
        peers = m.decode_keys(data, p.n)
        allowed = set(p.neighbours(me))
        if not set(peers) <= allowed:
            raise SecAggError(f"neighbour keys name non-neighbours {sorted(set(peers) - allowed)[:5]}")
        if len(peers) + 1 < p.threshold:
            raise SecAggError(f"{len(peers)} neighbours left, {p.threshold - 1} needed to share")
        xs = [j + 1 for j in sorted([*peers, me])]
        sk_sh = shamir.split(self.s_sk, p.threshold, xs)
        b_sh = shamir.split(self.seed, p.threshold, xs)
        cts = {}
        for j, (c_pk, _) in peers.items():
            key = _share_key(self.c_sk, c_pk, p, me, j)
            plain = me.to_bytes(4, "big") + j.to_bytes(4, "big") + sk_sh[j + 1] + b_sh[j + 1]
            cts[j] = crypto.seal(key, plain, _aad(p, me, j))
        self.peers, self.own, self.stage = peers, (sk_sh[me + 1], b_sh[me + 1]), "shared"
        return m.encode_cts(cts)

    def masked_input(self, routed: bytes, q: np.ndarray,
                     rng: np.random.Generator | None = None) -> bytes:
        """The quantized update ``q`` (int64, ``dim`` values in [−L, L]) plus this node's share
        of the distributed noise, masked, packed in k bits a coordinate. ``routed``: the
        ciphertexts neighbours in U2 addressed to this node; each must authenticate (else the
        whole request is refused and the node is a dropout the others recover from)."""
        self._expect("shared")
        p, me = self.params, self.index
        q = np.asarray(q)
        lv = ring.levels(p.bits)
        if q.shape != (p.dim,) or q.dtype.kind != "i" or (q.size and np.abs(q).max() > lv):
            raise SecAggError(f"update must be {p.dim} integers in [-{lv}, {lv}]")
        if p.weight_cap and not 0 <= int(q[-1]) <= p.weight_cap:
            raise SecAggError(f"the weight coordinate {int(q[-1])} is outside [0, "
                              f"{p.weight_cap}]")
        cts = m.decode_cts(routed, p.n, "routed shares")
        if not set(cts) <= set(self.peers):
            raise SecAggError(f"routed shares from nodes whose keys were not sent "
                              f"{sorted(set(cts) - set(self.peers))[:5]}")
        held = {}
        for i, ct in cts.items():
            plain = crypto.open_sealed(_share_key(self.c_sk, self.peers[i][0], p, i, me), ct,
                                       _aad(p, i, me))
            if plain[:8] != i.to_bytes(4, "big") + me.to_bytes(4, "big"):
                raise SecAggError(f"share from node {i} names another pair")
            sk, b = plain[8:8 + shamir.SHARE_BYTES], plain[8 + shamir.SHARE_BYTES:]
            shamir.share_value(sk), shamir.share_value(b)
            held[i] = (sk, b)
        noise = skellam(p.noise_var, p.dim, rng or np.random.default_rng())
        y = ring.to_ring(q + noise, p.ring_bits)
        y += crypto.prg(self.seed, p.dim, p.ring_bits)
        for i in sorted(cts):
            mask = crypto.prg(_mask_seed(self.s_sk, self.peers[i][1], p, me, i), p.dim,
                              p.ring_bits)
            if _pair_sign(me, i) > 0:
                y += mask
            else:
                y -= mask
        y &= np.uint64((1 << p.ring_bits) - 1)
        self.held, self.stage = held, "masked"
        return ring.pack(y, p.ring_bits)

    def unmask(self, data: bytes) -> bytes:
        """Reveal the b-shares of survivors and the s_sk-shares of dropped nodes — never both
        for one node, and only once."""
        self._expect("masked")
        p, me = self.params, self.index
        surv, drop = m.decode_unmask(data, p.n)
        if me not in surv:
            raise SecAggError("unmask request does not count this node as a survivor")
        unknown = (set(surv) | set(drop)) - set(self.held) - {me}
        if unknown:
            raise SecAggError(f"unmask request names nodes whose shares this node does not "
                              f"hold {sorted(unknown)[:5]}")
        if me in drop:
            raise SecAggError("unmask request lists this node as dropped")
        rows = []
        for i in sorted(surv):
            rows.append((i, m.KIND_SEED, self.own[1] if i == me else self.held[i][1]))
        for i in sorted(drop):
            rows.append((i, m.KIND_KEY, self.held[i][0]))
        self.stage = "done"
        return m.encode_reveal(rows)

    # ---- persistence between messages (a Flower node keeps it in its Context state)
    def to_record(self) -> dict[str, bytes | str | int]:
        return {"params": self.params.to_bytes(), "index": self.index, "c_sk": self.c_sk,
                "s_sk": self.s_sk, "seed": self.seed, "stage": self.stage,
                "peers": m.encode_keys(self.peers), "own": self.own[0] + self.own[1],
                "held": b"".join(i.to_bytes(4, "big") + a + b
                                 for i, (a, b) in sorted(self.held.items()))}

    @classmethod
    def from_record(cls, rec: Mapping[str, object]) -> "ClientSession":
        p = Params.from_bytes(rec["params"])  # type: ignore[arg-type]
        held_b, w = bytes(rec["held"]), 4 + 2 * shamir.SHARE_BYTES  # type: ignore[arg-type]
        held = {int.from_bytes(held_b[o:o + 4], "big"):
                (held_b[o + 4:o + 4 + shamir.SHARE_BYTES], held_b[o + 4 + shamir.SHARE_BYTES:o + w])
                for o in range(0, len(held_b), w)}
        own = bytes(rec["own"])  # type: ignore[arg-type]
        return cls(p, int(rec["index"]), bytes(rec["c_sk"]), bytes(rec["s_sk"]),  # type: ignore
                   bytes(rec["seed"]), str(rec["stage"]), m.decode_keys(rec["peers"], p.n),
                   (own[:shamir.SHARE_BYTES], own[shamir.SHARE_BYTES:]), held)


# =============================================================================== server


@dataclass
class ServerSession:
    """The server's side of one round. Each ``receive_*`` raises :class:`SecAggError` on a
    malformed or unexpected message (the caller drops it with that reason; the node then counts
    as dropped at that stage) and stores nothing of it."""

    params: Params
    keys: dict[int, tuple[bytes, bytes, bytes]] = field(default_factory=dict)   # U1
    sent_keys: dict[int, list[int]] = field(default_factory=dict)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)          # U2
    masked: set[int] = field(default_factory=set)                              # U3
    total: np.ndarray | None = None  # Σ of the masked inputs mod 2^k (kept as a running sum)
    asked: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)
    reveals: dict[int, list[tuple[int, int, bytes]]] = field(default_factory=dict)  # U4
    excluded: dict[int, str] = field(default_factory=dict)

    def receive_advertise(self, i: int, data: bytes) -> None:
        if not 0 <= i < self.params.n or i in self.keys:
            raise SecAggError(f"advertised keys from unknown or repeated index {i}")
        c_pk, s_pk, com = m.decode_advertise(data)
        if c_pk == s_pk:
            raise SecAggError("the two advertised public keys are equal")
        self.keys[i] = (c_pk, s_pk, com)

    def key_requests(self) -> dict[int, bytes]:
        """To each node of U1: its neighbours' keys (those in U1). A node with fewer than t − 1
        such neighbours cannot share and is left out (``excluded``)."""
        p, out = self.params, {}
        for i in sorted(self.keys):
            peers = [j for j in p.neighbours(i) if j in self.keys]
            if len(peers) + 1 < p.threshold:
                self.excluded[i] = f"{len(peers)} neighbours advertised keys, {p.threshold - 1} needed"
                continue
            self.sent_keys[i] = peers
            out[i] = m.encode_keys({j: self.keys[j][:2] for j in peers})
        return out

    def receive_shares(self, i: int, data: bytes) -> None:
        if i not in self.sent_keys or i in self.shares:
            raise SecAggError(f"shares from node index {i}, not asked or repeated")
        cts = m.decode_cts(data, self.params.n)
        if sorted(cts) != self.sent_keys[i]:
            raise SecAggError("shares are not addressed to exactly the neighbours sent")
        self.shares[i] = cts

    def routed(self) -> dict[int, bytes]:
        """To each node of U2: the ciphertexts addressed to it by its neighbours in U2."""
        p = self.params
        return {j: m.encode_cts({i: self.shares[i][j] for i in p.neighbours(j)
                                 if i in self.shares and j in self.shares[i]})
                for j in sorted(self.shares)}

    def receive_masked(self, j: int, data: bytes) -> None:
        if j not in self.shares or j in self.masked:
            raise SecAggError(f"masked input from node index {j}, not in U2 or repeated")
        y = ring.unpack(data, self.params.dim, self.params.ring_bits)
        if self.total is None:
            self.total = np.zeros(self.params.dim, np.uint64)
        self.total += y
        self.masked.add(j)

    @property
    def survivors(self) -> list[int]:
        return sorted(self.masked)

    @property
    def dropped(self) -> list[int]:
        """Nodes that shared their keys but sent no (valid) masked input."""
        return sorted(set(self.shares) - set(self.masked))

    def _need(self) -> None:
        """Refuse (RecoveryError) before asking, when the survivors cannot possibly hold t shares
        of every secret the sum needs."""
        p = self.params
        surv = set(self.masked)
        if len(surv) < p.threshold:
            raise RecoveryError(f"{len(surv)} nodes sent masked input, fewer than the "
                                f"threshold t = {p.threshold}: the sum is not revealed")
        for i in sorted(self.shares):
            have = len([j for j in self.sent_keys[i] if j in surv]) + (i in surv)
            if have < p.threshold:
                what = "self-mask seed" if i in surv else "mask key (it dropped after sharing)"
                raise RecoveryError(f"node index {i}'s {what} has {have} surviving holders, "
                                    f"t = {p.threshold} needed: too many dropouts")

    def unmask_requests(self) -> dict[int, bytes]:
        self._need()
        p, surv, out = self.params, set(self.masked), {}
        for j in self.survivors:
            # j holds shares from its neighbours in U2 that sent it theirs (all of them in U2)
            nb = [i for i in p.neighbours(j) if i in self.shares and j in self.shares[i]]
            s = sorted([j, *[i for i in nb if i in surv]])
            d = sorted(i for i in nb if i not in surv)
            self.asked[j] = (s, d)
            out[j] = m.encode_unmask(s, d)
        return out

    def receive_unmask(self, j: int, data: bytes) -> None:
        if j not in self.asked or j in self.reveals:
            raise SecAggError(f"revealed shares from node index {j}, not asked or repeated")
        rows = m.decode_reveal(data, self.params.n)
        s, d = self.asked[j]
        want = sorted([(i, m.KIND_SEED) for i in s] + [(i, m.KIND_KEY) for i in d])
        if sorted((i, k) for i, k, _ in rows) != want:
            raise SecAggError("revealed shares are not exactly the ones asked for")
        for _, _, sh in rows:
            shamir.share_value(sh)
        self.reveals[j] = rows

    def _reconstruct(self, i: int, kind: int, check) -> bytes:
        p = self.params
        pts = [(j + 1, sh) for j, rows in sorted(self.reveals.items())
               for (ii, k, sh) in rows if ii == i and k == kind]
        what = "self-mask seed" if kind == m.KIND_SEED else "mask key"
        if len(pts) < p.threshold:
            raise RecoveryError(f"node index {i}'s {what}: {len(pts)} shares revealed, "
                                f"t = {p.threshold} needed")
        tries = [pts] + [random.Random(k).sample(pts, p.threshold) for k in range(24)] \
            if len(pts) > p.threshold else [pts]
        for sub in tries:
            try:
                secret = shamir.combine(sub, p.threshold)
            except RecoveryError:
                continue
            if check(secret):
                return secret
        raise RecoveryError(f"node index {i}'s {what}: the revealed shares do not reconstruct "
                            "it (a wrong share)")

    def result(self) -> np.ndarray:
        """Σ_{U3} q (+ the nodes' noise) as int64, exact: the masked inputs' sum with every self
        mask and every dropped node's pairwise masks removed."""
        p = self.params
        self._need()
        kmask = np.uint64((1 << p.ring_bits) - 1)
        total = self.total.copy()
        for j in self.survivors:
            b = self._reconstruct(j, m.KIND_SEED,
                                  lambda s, j=j: crypto.commit(p.session, s) == self.keys[j][2])
            total -= crypto.prg(b, p.dim, p.ring_bits)
        for i in self.dropped:
            sk = self._reconstruct(i, m.KIND_KEY,
                                   lambda s, i=i: crypto.public_of(s) == self.keys[i][1])
            for j in self.sent_keys[i]:
                if j in self.masked:  # j masked with i (i is in U2 and j's neighbour)
                    mask = crypto.prg(_mask_seed(sk, self.keys[j][1], p, j, i), p.dim,
                                      p.ring_bits)
                    if _pair_sign(j, i) > 0:
                        total -= mask
                    else:
                        total += mask
        total &= kmask
        return ring.centred(total, p.ring_bits)
