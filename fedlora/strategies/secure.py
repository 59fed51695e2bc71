"""Secure aggregation on Flower's Message API: SecAgg+'s extra message rounds
(:mod:`fedlora.secagg`) inside one federated round, for the sum-based methods.

:meth:`SecureRounds.setup` (from ``configure_train``, once the round's nodes are sampled) runs
the *advertise* and *share* ``query.secagg`` exchanges through the grid and returns, per node
that shared, the train-config entries that route the shares addressed to it; the node trains,
clips its update to ``update-norm-bound``, quantizes, masks and replies with the k-bit packed
vector (``client_app``). :meth:`SecureRounds.aggregate` (from ``aggregate_train``) reads the
masked inputs, runs the *unmask* exchange and hands the method one pseudo-reply: the survivors'
mean on the round's coordinate set — weighted by ``num-examples`` (capped at W) for the methods
whose plain mean is, via one extra masked coordinate (:mod:`fedlora.secagg.mean`). A bad message at any stage is
dropped with its reason; a round that cannot be unmasked keeps the previous global model.
Distributed DP (``secagg-noise``: Skellam shares) and how it is charged to the accountant (an
approximation): docs/secure-aggregation.md ("Distributed differential privacy").
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from ..privacy import Accountant
from ..secagg.settings import SUM_METHODS, check_config, weight_cap, weighted  # noqa: F401
from ..secagg import (Params, RecoveryError, SecAggError, ServerSession, auto_degree,
                      auto_threshold, coordinate_set, ring)
from ..secagg import messages as wire_msgs
from ..secagg.mean import node_vector, survivors_mean
from ..wire import message_bytes
from .ledger import RoundStats
from .protocol import SERVER_ROUND, SecAggInstruction, TrainReply
from .replies import CONFIG_KEY, METRICS_KEY, ClientUpdate

log = logging.getLogger("flwr.fedlora")

#: the Message API action of the protocol's query messages (``query.secagg``)
ACTION = "secagg"
#: the ConfigRecord of a node's masked-input reply, and of its Context state
SECAGG_KEY = "fedlora-secagg"
#: a node's clipped update kept between its train reply and the values stage (rank union)
UPLOAD_KEY = "fedlora-secagg-upload"

def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


class SecureRounds:
    """The server's secure-aggregation state across rounds (the session of the current one,
    the distributed-DP accountant, each round's record)."""

    def __init__(self, strategy: Any) -> None:
        cfg = strategy.cfg
        check_config(cfg, strategy.name)
        self.s, self.cfg = strategy, cfg
        self.session: ServerSession | None = None
        self.index: dict[int, int] = {}   # node id → protocol index, this round
        self.coords: np.ndarray | None = None
        self.total = 0
        self.grid: Grid | None = None
        self.available = 0
        self.accountant = Accountant("central", "gaussian", cfg.dp_delta) \
            if cfg.secagg_noise > 0 else None
        self.records: dict[int, dict[str, Any]] = {}
        #: lora-a2 with secagg-rank-union: the train reply masks 0/1 slice indicators; the
        #: values of the union of the selected slices follow in a second session
        self.union = bool(cfg.secagg_rank_union)
        self.first_index: dict[int, int] = {}

    def _degree(self, n: int) -> int:
        c = self.cfg
        degree = min(c.secagg_neighbours if c.secagg_neighbours else auto_degree(n), n - 1)
        return degree - 1 if degree < n - 1 and degree % 2 else degree

    # ------------------------------------------------------------------ setup
    def _params(self, server_round: int, n: int) -> Params:
        c, z = self.cfg, float(self.cfg.secagg_noise)
        shapes = self.s.upload_shapes(server_round)
        self.total = int(sum(int(np.prod(s)) for s in shapes.values()))
        self.coords = coordinate_set(self.total, c.secagg_density, _seed(c.seed, server_round,
                                                                          "coords"))
        degree = self._degree(n)
        lv = ring.levels(c.secagg_bits)
        noise_var = (z * lv) ** 2 / n if z > 0 else 0.0
        cap = weight_cap(c) if weighted(c, self.s.name) else 0
        dim = int(self.coords.size) + (1 if cap else 0)
        if self.union:  # first session: one 0/1 indicator per rank slice, unweighted
            dim, cap = len(slice_table(shapes)), 0
        return Params(os.urandom(16), n, degree, auto_threshold(degree, c.secagg_threshold),
                      c.secagg_bits, ring.ring_bits(c.secagg_bits, n + math.ceil(10 * z)),
                      float(c.update_norm_bound), dim,
                      _seed(c.seed, server_round, "graph"), noise_var, cap)

    def _exchange(self, grid: Grid, stage: str, blobs: Mapping[int, bytes], key: str,
                  server_round: int, stats: RoundStats) -> dict[int, bytes]:
        """Send ``stage`` with ``blobs[i]`` (by protocol index) to each node; return the
        ``reply`` bytes of the valid answers by index (a bad answer is dropped with a reason)."""
        nodes = {n: i for n, i in self.index.items() if i in blobs}
        msgs = []
        for node, i in nodes.items():
            conf = {"stage": stage, SERVER_ROUND: server_round, "index": i, key: blobs[i]}
            msgs.append(Message(RecordDict({CONFIG_KEY: ConfigRecord(conf)}),
                                message_type=f"{MessageType.QUERY}.{ACTION}", dst_node_id=node))
        sent = sum(message_bytes(msg) for msg in msgs)
        by_id = {}  # message id → node: the SuperLink's error reply for a lost node names it
        for msg in msgs:
            if not msg.metadata.message_id:  # as Flower's push sets it (see base.py)
                msg.metadata.__dict__["_message_id"] = msg.object_id
            by_id[msg.metadata.message_id] = msg.metadata.dst_node_id
        stats.control_bytes += sent
        rec = self.records.setdefault(server_round, {"secagg_bytes_down": 0, "secagg_bytes_up": 0})
        rec["secagg_bytes_down"] += sent
        out: dict[int, bytes] = {}
        for reply in grid.send_and_receive(msgs, timeout=self.cfg.round_timeout):
            node = None
            try:
                node = reply.metadata.src_node_id
                if node == SUPERLINK_NODE_ID:
                    node = by_id.get(reply.metadata.reply_to_message_id, node)
                if node not in nodes or nodes[node] in out:
                    raise SecAggError("an answer from a node not asked, or a second answer")
                size = message_bytes(reply, hashed=False)
                stats.control_bytes += size
                rec["secagg_bytes_up"] += size
                if reply.has_error():
                    raise SecAggError(f"node failed: {str(reply.error.reason)[-300:]}")
                blob = reply.content.config_records[SECAGG_KEY]["reply"]
                if not isinstance(blob, bytes):
                    raise SecAggError("the reply is not bytes")
                out[nodes[node]] = blob
            except Exception as err:  # a node's answer never stops the round
                self._drop(stats, server_round, node, stage, err)
        return out

    def _stage(self, grid: Grid, stage: str, blobs: Mapping[int, bytes], key: str, receive: Any,
               server_round: int, stats: RoundStats) -> None:
        """One exchange (:meth:`_exchange`), each valid answer handed to the session's
        ``receive(index, bytes)``; one it refuses is dropped with its reason."""
        by_index = {i: n for n, i in self.index.items()}
        for i, data in sorted(self._exchange(grid, stage, blobs, key, server_round,
                                             stats).items()):
            try:
                receive(i, data)
            except SecAggError as err:
                self._drop(stats, server_round, by_index[i], stage, err)

    def _drop(self, stats: RoundStats, server_round: int, node: Any, stage: str,
              err: Exception) -> None:
        reason = f"secagg {stage}: {type(err).__name__}: {err}"[:500]
        stats.dropped.append({"node": node, "reason": reason})
        log.warning("round %d: dropped node %s: %s", server_round, node, reason)

    def setup(self, grid: Grid, server_round: int, node_ids: list[int], stats: RoundStats,
              available: int) -> dict[int, dict[str, Any]]:
        """Advertise and share stages; the train-config entries of each node that shared (the
        others are not sent a train message)."""
        self.grid, self.available = grid, available
        self.session = None
        if len(node_ids) < 2:
            log.error("round %d: secure aggregation needs >= 2 nodes, %d sampled", server_round,
                      len(node_ids))
            return {}
        self.index = {node: i for i, node in enumerate(node_ids)}
        p = self._params(server_round, len(node_ids))
        srv = self.session = ServerSession(p)
        blob = p.to_bytes()
        self._stage(grid, "advertise", {i: blob for i in self.index.values()}, "params",
                    srv.receive_advertise, server_round, stats)
        reqs = srv.key_requests()
        by_index = {i: n for n, i in self.index.items()}
        for i, why in srv.excluded.items():
            self._drop(stats, server_round, by_index[i], "share", SecAggError(why))
        self._stage(grid, "share", reqs, "keys", srv.receive_shares, server_round, stats)
        rec = self.records[server_round]
        rec.update({"secagg_n": p.n, "secagg_degree": p.degree, "secagg_threshold": p.threshold,
                    "secagg_ring_bits": p.ring_bits, "secagg_coordinates": p.dim,
                    "secagg_weight_cap": p.weight_cap, "secagg_shared": len(srv.shares)})
        return {by_index[i]: SecAggInstruction(blob, i, self.total,
                                               float(self.cfg.secagg_density),
                                               _seed(self.cfg.seed, server_round, "coords"),
                                               union=bool(self.union))
                for i, blob in srv.routed().items()}

    # ------------------------------------------------------------------ masked input → sum
    def aggregate(self, server_round: int, replies: list[Message], stats: RoundStats
                  ) -> tuple[list[ClientUpdate], ClientUpdate | None]:
        """The masked inputs read, the unmask stage run, the survivors' mean as one
        pseudo-reply (None when the sum cannot be revealed: the round is not applied)."""
        srv = self.session
        if srv is None or self.grid is None:
            return [], None
        ups: dict[int, ClientUpdate] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                i = self.index.get(node)
                if i is None:
                    raise SecAggError("not a node of this round's session")
                content = msg.content
                reply = TrainReply.from_record(content.metric_records[METRICS_KEY])
                data = content.config_records[SECAGG_KEY]["masked"]
                if not isinstance(data, bytes):
                    raise SecAggError("masked input is not bytes")
                srv.receive_masked(i, data)
                stats.payload_up[node] = len(data)
                ups[i] = ClientUpdate.of(node, reply)
            except Exception as err:
                self._drop(stats, server_round, node, "masked input", err)
        rec = self.records.setdefault(server_round, {})
        coords = self.coords
        try:
            self._stage(self.grid, "unmask", srv.unmask_requests(), "unmask",
                        srv.receive_unmask, server_round, stats)
            total = srv.result()
            if self.union:  # the counts of the slice indicators → the values session
                first = {i: ups[i].node_id for i in srv.survivors}
                srv, total, coords = self._values_round(server_round, first, total, stats, rec)
                if srv is None:
                    return [], None
                ups = {i: ups[self.first_index[node]] for node, i in self.index.items()
                       if node in self.first_index}
        except RecoveryError as err:
            stats.rejected = f"RecoveryError: {err}"[:500]
            log.error("round %d: secure aggregation cannot reveal the sum: %s", server_round, err)
            rec["secagg_recovered"] = False
            return [], None
        survivors = srv.survivors
        rec.update({"secagg_survivors": len(survivors), "secagg_dropped_after_sharing":
                    len(srv.dropped), "secagg_recovered": True})
        p = srv.params
        try:
            mean, wsum = survivors_mean(total, p, len(survivors))
        except SecAggError as err:  # a weight coordinate no honest node sends: not applied
            stats.rejected = f"SecAggError: {err}"[:500]
            log.error("round %d: %s", server_round, err)
            return [], None
        rec["secagg_weight_sum"] = wsum
        flat = np.zeros(self.total, np.float64)
        flat[coords] = mean
        tensors, off = OrderedDict(), 0
        for k, shape in sorted(self.s.upload_shapes(server_round).items()):
            size = int(np.prod(shape))
            tensors[k] = flat[off:off + size].reshape(shape).astype(np.float32)
            off += size
        updates = [ups[i] for i in survivors]
        if self.accountant is not None:
            z = float(self.cfg.secagg_noise) * math.sqrt(len(survivors) / p.n)
            q = min(1.0, p.n / max(self.available, p.n))
            self.accountant.charge(q, z)
            rec.update({"dp_noise_multiplier": z, "dp_sample_rate": q,
                        "dp_epsilon": self.accountant.epsilon(), "dp_delta": self.cfg.dp_delta})
        pseudo = ClientUpdate(-1, tensors, wsum, {})
        return updates, pseudo

    def _values_round(self, server_round: int, first: Mapping[int, Any], counts: np.ndarray,
                      stats: RoundStats, rec: dict[str, Any]) -> tuple[Any, Any, Any]:
        """Rank union (lora-a2, ``secagg-rank-union``): the first session's unmasked sum is,
        per rank slice, how many nodes selected it; the union (count > 0) is announced to the
        first session's survivors, which run a second, fresh session (own keys, own self-mask
        seeds: the first session's seeds were revealed) and mask their update's values on the
        union's coordinates only (weighted as usual). Returns (the second ServerSession, its
        unmasked sum, the coordinates), or (None, None, None) when the round cannot go on."""
        c, grid = self.cfg, self.grid
        chosen = np.asarray(counts) > 0
        coords = union_coordinates(self.s.upload_shapes(server_round), chosen)
        rec.update({"secagg_slices": int(chosen.size), "secagg_union_slices": int(chosen.sum()),
                    "secagg_values_coordinates": int(coords.size),
                    "secagg_weight_cap": weight_cap(c) if weighted(c, self.s.name) else 0})
        nodes = [first[i] for i in sorted(first)]
        self.first_index = dict(self.index)  # node → first-session index
        if len(nodes) < 2 or coords.size == 0:
            stats.rejected = (f"secure aggregation, rank union: {len(nodes)} nodes and "
                              f"{coords.size} coordinates left for the values session")
            log.error("round %d: %s", server_round, stats.rejected)
            return None, None, None
        n, cap = len(nodes), (weight_cap(c) if weighted(c, self.s.name) else 0)
        degree = self._degree(n)
        p = Params(os.urandom(16), n, degree, auto_threshold(degree, c.secagg_threshold),
                   c.secagg_bits, ring.ring_bits(c.secagg_bits, n), float(c.update_norm_bound),
                   int(coords.size) + (1 if cap else 0),
                   _seed(c.seed, server_round, "graph-values"), 0.0, cap)
        self.index = {node: j for j, node in enumerate(nodes)}
        srv = self.session = ServerSession(p)
        blob = p.to_bytes()
        self._stage(grid, "advertise", {j: blob for j in range(n)}, "params",
                    srv.receive_advertise, server_round, stats)
        reqs = srv.key_requests()
        for j, why in srv.excluded.items():
            self._drop(stats, server_round, nodes[j], "share", SecAggError(why))
        self._stage(grid, "share", reqs, "keys", srv.receive_shares, server_round, stats)
        bitmap = wire_msgs.encode_bitmap(chosen)

        def receive(j: int, data: bytes) -> None:
            srv.receive_masked(j, data)
            stats.payload_up[nodes[j]] = stats.payload_up.get(nodes[j], 0) + len(data)

        self._stage(grid, "values", {j: wire_msgs.encode_values(bitmap, r)
                                     for j, r in srv.routed().items()}, "values", receive,
                    server_round, stats)
        self._stage(grid, "unmask", srv.unmask_requests(), "unmask", srv.receive_unmask,
                    server_round, stats)
        return srv, srv.result(), coords

    def record(self, server_round: int) -> dict[str, Any]:
        return dict(self.records.get(server_round, {}))

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict() if self.accountant else []}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.accountant is not None:
            self.accountant.load_state_dict(state.get("accountant", []))


# ====================================================================== the node's half


def flatten(upload: Mapping[str, np.ndarray]) -> np.ndarray:
    """The upload's tensors in name order as one float64 vector (the server's order)."""
    return np.concatenate([np.asarray(upload[k], np.float64).reshape(-1)
                           for k in sorted(upload)]) if upload else np.zeros(0)


def slice_table(shapes: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Every rank slice of the upload's LoRA factors, (key, rank index), keys in name order:
    the order of the rank-union indicators and bitmap."""
    from ..adapters import is_lora_key, rank_axis

    return [(k, i) for k in sorted(shapes) if is_lora_key(k)
            for i in range(int(tuple(shapes[k])[rank_axis(k)]))]


def slice_indicators(upload: Mapping[str, np.ndarray]) -> np.ndarray:
    """1 for each slice of :func:`slice_table` that the update carries (a non-zero value), else
    0 (int64): a node's input to the rank-union's first secure sum."""
    from ..adapters import is_lora_key, rank_axis
    from .guard import carried_ranks

    out = []
    for k in sorted(upload):
        if is_lora_key(k):
            v = np.asarray(upload[k])
            ind = np.zeros(v.shape[rank_axis(k)], np.int64)
            ind[carried_ranks(k, v)] = 1
            out.append(ind)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def union_coordinates(shapes: Mapping[str, Any], chosen: np.ndarray) -> np.ndarray:
    """The flat coordinates (in :func:`flatten`'s order) of the announced slices ``chosen``
    (bool, one per :func:`slice_table` entry) and of every non-LoRA tensor."""
    from ..adapters import is_lora_key, rank_axis, rank_mask

    parts, j = [], 0
    for k in sorted(shapes):
        shape = tuple(int(d) for d in shapes[k])
        if is_lora_key(k):
            r = shape[rank_axis(k)]
            parts.append(rank_mask(k, shape, np.flatnonzero(chosen[j:j + r])).reshape(-1))
            j += r
        else:
            parts.append(np.ones(int(np.prod(shape)), bool))
    if j != len(chosen):
        raise SecAggError(f"{len(chosen)} announced slices for {j} rank slices")
    return np.flatnonzero(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def announced_coordinates(conf: SecAggInstruction) -> np.ndarray:
    """The round's coordinate set as the train config announces it (density and seed: every
    node derives the same set, the server too; their types and ranges are checked when the
    node parses the instruction, :meth:`SecAggInstruction.from_config`)."""
    return coordinate_set(conf.total, conf.density, conf.coords_seed)


def client_masked_input(session: Any, conf: SecAggInstruction,
                        upload: Mapping[str, np.ndarray], num_examples: int = 1) -> bytes:
    """The node's step in its train reply: clip the update to C (L2), take the round's
    coordinates, quantize by stochastic rounding (scaled by its capped weight and followed by
    it, in a weighted round), add the noise share, mask, pack."""
    p = session.params
    x = flatten(upload)
    total = conf.total
    if x.size != total:
        raise SecAggError(f"the update has {x.size} coordinates, the server expects {total}")
    x = _clipped(x, p.clip)
    coords = announced_coordinates(conf)
    q = node_vector(x[coords], num_examples, p, np.random.default_rng())
    return session.masked_input(conf.routed, q)


def _clipped(x: np.ndarray, clip: float) -> np.ndarray:
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm):
        raise SecAggError("the update is not finite")
    return x * (clip / norm) if norm > clip else x


def client_indicator_input(session: Any, conf: SecAggInstruction,
                           upload: Mapping[str, np.ndarray], num_examples: int,
                           context: Any) -> bytes:
    """Rank union, the node's train reply: keep its clipped update and weight in its Context
    (for the values stage) and mask its 0/1 slice indicators in the first session."""
    import json

    p = session.params
    x = flatten(upload)
    if x.size != conf.total:
        raise SecAggError(f"the update has {x.size} coordinates, the server expects {conf.total}")
    x = _clipped(x, p.clip)
    ind = slice_indicators(upload)
    if ind.size != p.dim:
        raise SecAggError(f"{ind.size} rank slices, the session masks {p.dim}")
    context.state[UPLOAD_KEY] = ConfigRecord({
        "x": x.astype(np.float64).tobytes(), "w": int(num_examples),
        "shapes": json.dumps({k: list(np.shape(upload[k])) for k in sorted(upload)})})
    return session.masked_input(conf.routed, ind)


def client_values(session: Any, data: bytes, context: Any) -> bytes:
    """Rank union, the values stage: the announced slices (strict bitmap) → the kept update's
    values on their coordinates, quantized (weighted) and masked in the second session."""
    import json

    rec = context.state.config_records.get(UPLOAD_KEY)
    if rec is None:
        raise SecAggError("no kept update on this node (no rank-union train reply this round)")
    shapes = {k: tuple(v) for k, v in json.loads(str(rec["shapes"])).items()}
    table = slice_table(shapes)
    chosen, routed = wire_msgs.decode_values(data, len(table), session.params.n)
    coords = union_coordinates(shapes, chosen)
    x = np.frombuffer(bytes(rec["x"]), np.float64)
    q = node_vector(x[coords], int(rec["w"]), session.params, np.random.default_rng())
    return session.masked_input(routed, q)


def _load(context: Any) -> Any:
    from ..secagg import ClientSession

    rec = context.state.config_records.get(SECAGG_KEY)
    if rec is None:
        raise SecAggError("no secure-aggregation session on this node (advertise first)")
    return ClientSession.from_record(dict(rec))


def client_query(msg: Message, context: Any) -> Message:
    """A node's answer to a ``query.secagg`` message (stages advertise, share, unmask); the
    session lives in the node's Context state between messages. Raises on a bad request (Flower
    sends the server an error reply, which it records as the node's drop reason)."""
    from ..secagg import ClientSession

    conf = msg.content.config_records[CONFIG_KEY]
    stage, index = str(conf["stage"]), int(conf["index"])
    if stage == "advertise":
        sess = ClientSession(Params.from_bytes(conf["params"]), index)
        reply = sess.advertise()
    else:
        sess = _load(context)
        if sess.index != index:
            raise SecAggError(f"request for index {index}, this node's session is {sess.index}")
        if stage == "share":
            reply = sess.share_keys(conf["keys"])
        elif stage == "unmask":
            reply = sess.unmask(conf["unmask"])
        elif stage == "values":
            reply = client_values(sess, conf["values"], context)
        else:
            raise SecAggError(f"unknown secure-aggregation stage {stage!r}")
    context.state[SECAGG_KEY] = ConfigRecord(sess.to_record())
    return Message(RecordDict({SECAGG_KEY: ConfigRecord({"reply": reply})}), reply_to=msg)


def client_train_reply(msg: Message, context: Any, res: Any, conf: SecAggInstruction
                       ) -> Message:
    """The train reply under secure aggregation: the masked, k-bit packed update and the
    metrics (no adapter payload)."""
    sess = _load(context)
    if sess.index != conf.index:
        raise SecAggError("train message for another secure-aggregation index")
    if conf.union:
        blob = client_indicator_input(sess, conf, res.upload, int(res.num_examples), context)
    else:
        blob = client_masked_input(sess, conf, res.upload, int(res.num_examples))
    context.state[SECAGG_KEY] = ConfigRecord(sess.to_record())
    metrics = dataclasses.replace(res.reply, payload_up=len(blob)).to_record()
    return Message(RecordDict({SECAGG_KEY: ConfigRecord({"masked": blob}),
                               METRICS_KEY: metrics}), reply_to=msg)
