"""The download side of a round: what each node is sent, and the server's record of what it holds.

``download=full``: every sampled node gets ``codec-down(target)``. ``download=delta``: the
server keeps, per node, an exact copy of what that node holds (``held``, decoded exactly as the
node decodes it) and sends ``codec-down(target − held)``; what the codec dropped goes out with
the next delta (server-side error feedback, per node). A node without a record gets a full
download (``codec-down-full``) or, with ``download-init``, a delta from the run's initial state
(``down-from-init``); the message names the digests of the base (``down-base``) and result
(``down-digest``), and a node whose copy differs refuses the round (:class:`StaleDownload`) and
is served in full next time. A record is committed only when the node's reply for that round
arrived and decoded; ``delta-max-nodes`` bounds the records (least recently served evicted
first). Why, and what it saves: docs/downloads.md.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..compression import Pipeline, parse_spec
from .protocol import DownInstruction

MODES = ("full", "delta")


def digest(state: Mapping[str, np.ndarray]) -> str:
    """A 128-bit digest of a state's names, shapes and float32 bytes, in name order (the node may
    hold its tensors in another order than the server's record)."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state):
        a = np.ascontiguousarray(state[k], dtype=np.float32)
        h.update(k.encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def apply_delta(held: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
                ) -> "OrderedDict[str, np.ndarray]":
    """``held + delta`` in float32, the one rule both the server record and the node use."""
    if list(held) != list(delta):
        raise ValueError("a delta download must name the same tensors as the copy it updates")
    return OrderedDict((k, (np.asarray(held[k], np.float32) + np.asarray(delta[k], np.float32))
                        .astype(np.float32, copy=False)) for k in held)


@dataclass
class Copy:
    """The server's exact record of one node's model."""

    state: "OrderedDict[str, np.ndarray]"
    digest: str


@dataclass
class Download:
    """One encoded download and what the node will hold once it applied it."""

    payload: bytes
    spec: str
    mode: str            # "full" or "delta"
    base: str            # digest the delta applies to ("" for full)
    result: Copy         # the node's model after applying it


class Downlink:
    """Per-node download encoder and record keeper (see the module docstring)."""

    def __init__(self, mode: str = "full", full_spec: str = "", max_nodes: int = 10000,
                 by_digest: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"run-config 'download' must be one of {MODES}, got {mode!r}")
        if max_nodes < 1:
            raise ValueError(f"run-config 'delta-max-nodes' must be >= 1, got {max_nodes}")
        self.mode = mode
        self.full_spec = parse_spec(full_spec) if full_spec else None
        self.max_nodes = int(max_nodes)
        self.by_digest = bool(by_digest)  # payload format 2: the tensor table as a digest
        self.held: "OrderedDict[int, Copy]" = OrderedDict()      # node → committed copy
        self.pending: dict[int, tuple[int, Copy]] = {}            # node → (round, sent copy)
        self._cache: dict[tuple, Download] = {}
        #: download-init: the initial adapter state every node builds itself, the nodes sent a
        #: delta from it this round, and those that refused one (served in full from then on)
        self.init: Copy | None = None
        self.from_init: set[int] = set()
        self.init_refused: set[int] = set()

    def set_init(self, state: Mapping[str, np.ndarray]) -> None:
        """Start nodes without a record at ``state`` (the run's initial adapter state)."""
        st = OrderedDict((k, np.asarray(v, np.float32)) for k, v in state.items())
        self.init = Copy(st, digest(st))

    def _start_copy(self, node: int, target: Mapping[str, np.ndarray]) -> Copy | None:
        """The copy a node without a record starts from: the initial state, where it has the
        target's names and shapes and the node never refused it; else None (a full download)."""
        init = self.init
        if init is None or node in self.init_refused or list(init.state) != list(target):
            return None
        if any(init.state[k].shape != np.shape(target[k]) for k in target):
            return None
        return init

    @property
    def delta(self) -> bool:
        return self.mode == "delta"

    def full_pipe(self, pipe: Pipeline) -> Pipeline:
        return (self.full_spec.keyed(pipe.key) if self.full_spec is not None
                else pipe.with_sparsifier(None))

    # ---------------------------------------------------------------- round bookkeeping
    def settle(self, server_round: int, ok_nodes) -> None:
        """Commit the copies sent in ``server_round`` to the nodes whose replies arrived and
        decoded; forget the records of the others (their next download is full)."""
        ok = set(ok_nodes)
        for node, (rnd, _) in list(self.pending.items()):
            if rnd == server_round:
                self._commit(node, node in ok)
        self._evict()

    def settle_node(self, node: int, ok: bool) -> None:
        """:meth:`settle` for one node, whatever round its copy was sent in (the async loop:
        each reply settles its own node's download as it arrives): commit the copy sent to
        ``node`` if ``ok``, else forget its record (its next download is full)."""
        if node in self.pending:
            self._commit(node, ok)
            self._evict()

    def _commit(self, node: int, ok: bool) -> None:
        _, copy = self.pending.pop(node)
        if node in self.from_init:
            self.from_init.discard(node)
            if not ok:  # it may hold another initial state: serve it in full
                self.init_refused.add(node)
        if ok:
            self.held[node] = copy
            self.held.move_to_end(node)
        else:
            self.held.pop(node, None)

    def _evict(self) -> None:
        while len(self.held) > self.max_nodes:
            self.held.popitem(last=False)

    def start_round(self) -> None:
        self._cache.clear()

    # ---------------------------------------------------------------- encoding
    def prepare(self, server_round: int, node: int, target: Mapping[str, np.ndarray],
                pipe: Pipeline, variant=None) -> Download:
        """Encode ``target`` for ``node``: a delta from its held copy, else a full download.
        Nodes with the same held copy (same digest), codec and variant share one encode."""
        if not self.delta:
            key = ("full", pipe.spec, variant)
            if key not in self._cache:
                payload = pipe.encode(target, by_digest=self.by_digest)
                self._cache[key] = Download(payload, pipe.spec, "full", "", None)  # type: ignore[arg-type]
            return self._cache[key]
        held = self.held.get(node)
        if held is not None and list(held.state) != list(target):
            held = None  # the method changed what travels: start over
        if held is None:
            held = self._start_copy(node, target)
            if held is not None:
                self.from_init.add(node)
        else:
            self.from_init.discard(node)
        if held is None:
            full = self.full_pipe(pipe)
            key = ("full", full.spec, variant)
            if key not in self._cache:
                payload = full.encode(target, by_digest=self.by_digest)
                got = full.decode(payload, expected={k: v.shape for k, v in target.items()})
                state = OrderedDict((k, np.asarray(got[k], np.float32)) for k in target)
                self._cache[key] = Download(payload, full.spec, "full", "",
                                            Copy(state, digest(state)))
            dl = self._cache[key]
        else:
            key = ("delta", held.digest, pipe.spec, variant)
            if key not in self._cache:
                diff = OrderedDict((k, np.asarray(target[k], np.float32) - held.state[k])
                                   for k in target)
                payload = pipe.encode(diff, by_digest=self.by_digest)
                got = pipe.decode(payload, expected={k: v.shape for k, v in diff.items()})
                state = apply_delta(held.state, OrderedDict((k, got[k]) for k in diff))
                self._cache[key] = Download(payload, pipe.spec, "delta", held.digest,
                                            Copy(state, digest(state)))
            dl = self._cache[key]
        self.pending[node] = (server_round, dl.result)
        return dl

    def residual(self, node: int, target: Mapping[str, np.ndarray]
                 ) -> "OrderedDict[str, np.ndarray] | None":
        """What the server still owes ``node``: ``target − held`` (None without a record)."""
        held = self.held.get(node)
        if held is None:
            return None
        return OrderedDict((k, np.asarray(target[k], np.float32) - held.state[k]) for k in target)

    def message_config(self, dl: Download) -> DownInstruction:
        """What tells the node how to apply ``dl`` (the train instruction's ``down``)."""
        if not self.delta:
            return DownInstruction()
        return DownInstruction(dl.mode, dl.base, dl.result.digest,
                               self.init is not None and dl.mode == "delta"
                               and dl.base == self.init.digest)


# ============================================================================ client half


class StaleDownload(ValueError):
    """The node does not hold the copy a delta download applies to."""


def client_apply(decoded: Mapping[str, np.ndarray], down: DownInstruction, held: Copy | None,
                 init: "Callable[[], Copy] | None" = None
                 ) -> tuple["OrderedDict[str, np.ndarray]", Copy | None]:
    """The node's side: the model it trains from, and the copy to keep (None in ``full`` mode).

    ``decoded`` is the decoded payload; ``down`` the train instruction's download part;
    ``held`` the node's stored copy (from its Context state) or None; ``init`` builds the
    node's initial adapter state (the base of a ``from_init`` delta). A delta whose base is
    not the held copy raises :class:`StaleDownload`; a result whose digest is not the server's
    raises it too."""
    mode = down.mode
    if mode == "delta" and down.from_init and init is not None:
        held = init() if held is None or held.digest != (down.base or "") else held
    if mode == "full" and down.digest is None:
        return OrderedDict((k, np.asarray(v, np.float32)) for k, v in decoded.items()), None
    if mode == "delta":
        base = down.base or ""
        if held is None:
            raise StaleDownload("delta download, but this node holds no copy of the global "
                                "model (state lost?); the server will send it in full")
        if held.digest != base:
            raise StaleDownload(f"delta download applies to copy {base[:12]}…, this node holds "
                                f"{held.digest[:12]}…; the server will send it in full")
        state = apply_delta(held.state, decoded)
    elif mode == "full":
        state = OrderedDict((k, np.asarray(v, np.float32)) for k, v in decoded.items())
    else:
        raise ValueError(f"unknown down-mode {mode!r}")
    copy = Copy(state, digest(state))
    want = down.digest or ""
    if copy.digest != want:
        raise StaleDownload(f"applied download has digest {copy.digest[:12]}…, the server "
                            f"recorded {want[:12]}…")
    return state, copy
