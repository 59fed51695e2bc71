"""What every fedlora method shares.

Server half (:class:`FedLoraStrategy`, a ``flwr.serverapp.strategy.FedAvg`` subclass):
sample nodes → encode the global trainable state per node with ``codec-down`` (one encode per
distinct spec) → measure each message → decode every reply defensively (a corrupt or malformed
reply is dropped and logged with its node id and reason; the round goes on) → measure it →
hand the decoded updates to the method's :meth:`aggregate_updates`.

Client half (:class:`ClientRound`): the decoded download, the node's data and the task, handed to a
method's ``client_train`` function, which returns what to upload.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..compression import CodecError, parse_spec
from ..config import RunConfig, split_list, tier_value
from ..wire import decode_record, encode_record, message_bytes, payload_bytes

log = logging.getLogger("flwr.fedlora")

ADAPTER_KEY = "adapter"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"

State = "OrderedDict[str, np.ndarray]"


def arrays_to_state(arrays: ArrayRecord) -> "OrderedDict[str, np.ndarray]":
    """Server-internal dense state (numpy Arrays) → ordered dict of float32 arrays."""
    return OrderedDict((k, np.asarray(arrays[k].numpy(), dtype=np.float32)) for k in arrays.keys())


def state_to_arrays(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v, dtype=np.float32)))
                                   for k, v in state.items()))


@dataclass
class ClientUpdate:
    node_id: int
    tensors: "OrderedDict[str, np.ndarray]"
    num_examples: int
    metrics: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundStats:
    round: int
    t_start: float = field(default_factory=time.time)
    sent: dict[int, int] = field(default_factory=dict)          # node → wire bytes down
    payload_down: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)      # node → wire bytes up
    payload_up: dict[int, int] = field(default_factory=dict)
    params_up: dict[int, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # error replies
    dropped: list[dict[str, Any]] = field(default_factory=list)   # replies that did not decode
    train_metrics: dict[str, float] = field(default_factory=dict)
    control_bytes: int = 0                                       # tier queries etc.


class MalformedReply(ValueError):
    """A reply whose content is not a valid upload for this round."""


def _positive_examples(metrics: MetricRecord) -> int:
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        raise MalformedReply(f"num-examples must be a positive number, got {n!r}")
    return int(n)


class FedLoraStrategy(FedAvg):
    """Common server half of every fedlora method. Subclasses implement
    :meth:`aggregate_updates` and may override the hooks below."""

    name = "base"
    adapter = True  # clients build the peft adapter model (False: the full model)

    def __init__(self, cfg: RunConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
        super().__init__(
            fraction_train=cfg.fraction_train, fraction_evaluate=0.0,
            min_train_nodes=cfg.min_train_nodes, min_available_nodes=cfg.min_available_nodes,
            arrayrecord_key=ADAPTER_KEY, configrecord_key=CONFIG_KEY,
        )
        self.cfg = cfg
        self.shapes = dict(shapes)
        parse_spec(cfg.codec_up)  # fail at start, not in round 1, on a bad spec
        parse_spec(cfg.codec_down)
        if cfg.client_sampling not in ("partition", "flower"):
            raise ValueError(f"run-config 'client-sampling' must be 'partition' or 'flower', "
                             f"got {cfg.client_sampling!r}")
        self.stats: dict[int, RoundStats] = {}
        self._global: "OrderedDict[str, np.ndarray] | None" = None
        self.tiers: dict[int, int] = {}  # node id → tier, learnt with a query message
        self.partitions: dict[int, int] = {}  # node id → partition-id, learnt with it too
        for spec in split_list(cfg.tier_codec_up) + split_list(cfg.tier_codec_down):
            parse_spec(spec)

    def ensure_no_sparsifier(self, up: bool = True, down: bool = False) -> None:
        """For methods that add their own sparsifier (``topk``/``ranks``) to the user's specs:
        those specs, per-tier ones included, must not sparsify."""
        c = self.cfg
        specs = ([c.codec_up, *split_list(c.tier_codec_up)] if up else []) + \
                ([c.codec_down, *split_list(c.tier_codec_down)] if down else [])
        for spec in specs:
            if parse_spec(spec).sparsifier is not None:
                raise ValueError(f"{self.name} adds its own sparsifier: codec spec {spec!r} "
                                 "must not sparsify")

    # ---------------------------------------------------------------- tiers
    @property
    def uses_tiers(self) -> bool:
        c = self.cfg
        return bool(c.tier_density or c.tier_codec_up or c.tier_codec_down or c.tier_rank)

    def tier_of(self, node_id: int | None) -> int:
        return self.tiers.get(node_id, 0) if node_id is not None else 0

    @property
    def samples_partitions(self) -> bool:
        return self.cfg.client_sampling == "partition"

    def learn_tiers(self, grid: Grid, node_ids: list[int], stats: "RoundStats") -> None:
        """Ask nodes not seen before for their tier and partition-id (a ``query`` message; the
        ClientApp answers from its node config). Its bytes are counted as control traffic of the
        round. A node that does not answer gets tier 0 and is sampled after the known ones."""
        unknown = [n for n in node_ids if n not in self.tiers]
        if not unknown or not (self.uses_tiers or self.samples_partitions):
            return
        queries = [Message(RecordDict({CONFIG_KEY: ConfigRecord({"ask": "tier"})}),
                           message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        stats.control_bytes += sum(message_bytes(q) for q in queries)
        for reply in grid.send_and_receive(queries, timeout=self.cfg.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
                log.warning("node %s did not report its tier; using tier 0", node)
                continue
            stats.control_bytes += message_bytes(reply)
            answer = reply.content.metric_records[METRICS_KEY]
            self.tiers[node] = int(answer.get("tier", 0))
            self.partitions[node] = int(answer.get("partition-id", -1))
        if self.uses_tiers:
            log.info("tiers: %s", {n: self.tier_of(n) for n in node_ids})

    def sample_by_partition(self, server_round: int, all_nodes: list[int], k: int) -> list[int]:
        """``k`` nodes chosen by a generator seeded with (seed, round) over the nodes ordered by
        partition-id: the same partitions in every run with the same seed and the same set of
        partitions, whatever node ids Flower assigned. Unknown partitions sort last (by id)."""
        big = 1 << 62
        order = sorted(all_nodes, key=lambda n: (p if (p := self.partitions.get(n, -1)) >= 0
                                                  else big, n))
        k = min(k, len(order))
        rng = np.random.default_rng([int(self.cfg.seed) & 0xFFFFFFFF, int(server_round)])
        return [order[i] for i in sorted(rng.choice(len(order), size=k, replace=False).tolist())]

    # ---------------------------------------------------------------- hooks for methods
    def download_state(self, server_round: int, state: "OrderedDict[str, np.ndarray]"
                       ) -> "OrderedDict[str, np.ndarray]":
        """What clients receive this round (before encoding)."""
        return state

    def download_spec(self, server_round: int, node_id: int | None) -> str:
        return tier_value(self.cfg.tier_codec_down, self.tier_of(node_id), self.cfg.codec_down)

    def upload_spec(self, server_round: int, node_id: int | None) -> str:
        return tier_value(self.cfg.tier_codec_up, self.tier_of(node_id), self.cfg.codec_up)

    def download_variant(self, server_round: int, node_id: int | None) -> Any:
        """A hashable key when a node needs its own version of the download (e.g. its rank),
        else None; :meth:`apply_variant` builds it."""
        return None

    def apply_variant(self, download: "OrderedDict[str, np.ndarray]", variant: Any
                      ) -> "OrderedDict[str, np.ndarray]":
        return download

    def node_config(self, server_round: int, node_id: int) -> dict[str, Any]:
        """Extra per-node entries for the train ConfigRecord."""
        return {}

    def upload_shapes(self, server_round: int) -> Mapping[str, tuple[int, ...]]:
        """Names and shapes a valid reply must decode to this round."""
        return self.shapes

    def aggregate_updates(self, server_round: int, state: "OrderedDict[str, np.ndarray]",
                          updates: list[ClientUpdate]) -> "OrderedDict[str, np.ndarray]":
        raise NotImplementedError

    def eval_state(self, server_round: int, state: "OrderedDict[str, np.ndarray]"
                   ) -> "OrderedDict[str, np.ndarray]":
        """The model as clients receive it after ``server_round``: the next round's download
        through the (default) codec-down round trip."""
        down = self.download_state(server_round + 1, state)
        return decode_record(encode_record(down, self.download_spec(server_round + 1, None)),
                             expected=None)

    # ---------------------------------------------------------------- Flower Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        stats = self.stats[server_round] = RoundStats(server_round)
        self._global = arrays_to_state(arrays)
        if self.fraction_train == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        sample_size = max(num_nodes, self.min_train_nodes)
        node_ids, all_nodes = sample_nodes(grid, self.min_available_nodes, sample_size)
        if self.samples_partitions:
            self.learn_tiers(grid, list(all_nodes), stats)
            node_ids = self.sample_by_partition(server_round, list(all_nodes), len(node_ids))
        else:
            self.learn_tiers(grid, node_ids, stats)
        log.info("configure_train: round %d, sampled %d of %d nodes%s", server_round,
                 len(node_ids), len(all_nodes),
                 f" (partitions {[self.partitions.get(n, -1) for n in node_ids]})"
                 if self.samples_partitions else "")
        download = self.download_state(server_round, self._global)
        encoded: dict[tuple, ArrayRecord] = {}
        messages = []
        for node_id in node_ids:
            spec = parse_spec(self.download_spec(server_round, node_id)).spec
            variant = self.download_variant(server_round, node_id)
            key = (spec, variant)
            if key not in encoded:
                mine = download if variant is None else self.apply_variant(download, variant)
                encoded[key] = encode_record(mine, spec)
            cfg = ConfigRecord({
                **{k: config[k] for k in config.keys()},
                "server-round": server_round,
                "method": self.name,
                "codec-down": spec,
                "codec-up": parse_spec(self.upload_spec(server_round, node_id)).spec,
                "tier": self.tier_of(node_id),
                **self.node_config(server_round, node_id),
            })
            msg = Message(content=RecordDict({ADAPTER_KEY: encoded[key], CONFIG_KEY: cfg}),
                          message_type=MessageType.TRAIN, dst_node_id=node_id)
            stats.sent[node_id] = message_bytes(msg)
            stats.payload_down[node_id] = payload_bytes(encoded[key])
            messages.append(msg)
        return messages

    def decode_reply(self, server_round: int, msg: Message) -> ClientUpdate:
        """Validate and decode one reply; raises CodecError / MalformedReply."""
        content = msg.content
        if ADAPTER_KEY not in content.array_records:
            raise MalformedReply(f"no ArrayRecord {ADAPTER_KEY!r} in reply")
        if METRICS_KEY not in content.metric_records:
            raise MalformedReply(f"no MetricRecord {METRICS_KEY!r} in reply")
        metrics = content.metric_records[METRICS_KEY]
        n = _positive_examples(metrics)
        tensors = decode_record(content.array_records[ADAPTER_KEY],
                                expected=self.upload_shapes(server_round))
        for k, v in tensors.items():
            if not np.all(np.isfinite(v)):
                raise MalformedReply(f"{k} holds NaN/Inf")
        cfg = dict(content.config_records[CONFIG_KEY]) if CONFIG_KEY in content.config_records else {}
        return ClientUpdate(msg.metadata.src_node_id, OrderedDict(tensors), n,
                            {k: float(v) for k, v in metrics.items()
                             if isinstance(v, (int, float))}, cfg)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, RoundStats(server_round))
        updates: list[ClientUpdate] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                reason = msg.error.reason
                # the exception itself is at the end of a traceback: keep the tail
                stats.failures.append({"node": node, "reason": str(reason)[-800:]})
                log.warning("round %d: node %s failed: %s", server_round, node,
                            str(reason)[-400:])
                continue
            try:
                stats.received[node] = message_bytes(msg)
                up = self.decode_reply(server_round, msg)
            except (CodecError, MalformedReply, KeyError, TypeError, ValueError) as err:
                stats.dropped.append({"node": node, "reason": f"{type(err).__name__}: {err}"[:500]})
                log.warning("round %d: dropped reply of node %s: %s: %s", server_round, node,
                            type(err).__name__, err)
                continue
            ar = msg.content.array_records[ADAPTER_KEY]
            stats.payload_up[node] = payload_bytes(ar)
            stats.params_up[node] = int(up.metrics.get("params-up", 0))
            updates.append(up)
        log.info("aggregate_train: round %d, %d valid, %d failed, %d dropped", server_round,
                 len(updates), len(stats.failures), len(stats.dropped))
        if not updates or self._global is None:
            return None, None
        new_state = self.aggregate_updates(server_round, self._global, updates)
        for k, v in new_state.items():
            if not np.all(np.isfinite(v)):
                log.error("round %d: aggregate of %s is not finite; keeping the previous "
                          "global model", server_round, k)
                return None, None
        total = sum(u.num_examples for u in updates)
        keys = sorted({k for u in updates for k in u.metrics if k != "num-examples"})
        stats.train_metrics = {
            k: sum(u.metrics.get(k, 0.0) * u.num_examples for u in updates) / total for k in keys
        }
        stats.train_metrics["num-examples"] = total
        return state_to_arrays(new_state), MetricRecord(stats.train_metrics)

    # ---------------------------------------------------------------- records
    def round_record(self, server_round: int) -> dict[str, Any]:
        s = self.stats.get(server_round)
        if s is None:
            return {"round": server_round, "clients": 0, "failures": 0, "dropped": 0,
                    "bytes_down": 0, "bytes_up": 0, "payload_down": 0, "payload_up": 0}
        return {
            "round": server_round,
            "clients": len(s.received) - len(s.dropped),
            "failures": len(s.failures),
            "dropped": len(s.dropped),
            "bytes_down": sum(s.sent.values()),
            "bytes_up": sum(s.received.values()),
            "payload_down": sum(s.payload_down.values()),
            "payload_up": sum(s.payload_up.values()),
            "params_up": sum(s.params_up.values()),
            "control_bytes": s.control_bytes,
            "tiers": {str(k): self.tier_of(k) for k in s.sent},
            "partitions": sorted(self.partitions.get(k, -1) for k in s.sent),
            "bytes_down_per_node": {str(k): v for k, v in s.sent.items()},
            "bytes_up_per_node": {str(k): v for k, v in s.received.items()},
            "failure_reasons": s.failures,
            "dropped_reasons": s.dropped,
            "train_metrics": s.train_metrics,
            "round_s": round(time.time() - s.t_start, 3),
        }


def weighted_mean(updates: list[ClientUpdate]) -> "OrderedDict[str, np.ndarray]":
    """Σ_k n_k x_k / Σ_k n_k over each tensor, in float64 then cast to float32."""
    total = float(sum(u.num_examples for u in updates))
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for k in updates[0].tensors:
        acc = np.zeros(updates[0].tensors[k].shape, dtype=np.float64)
        for u in updates:
            acc += (u.num_examples / total) * u.tensors[k].astype(np.float64)
        out[k] = acc.astype(np.float32)
    return out


# ====================================================================================== client


@dataclass
class ClientRound:
    """Everything a method's client half needs for one train message."""

    cfg: RunConfig
    task: Any
    config: dict[str, Any]           # the message's train config
    received: "OrderedDict[str, np.ndarray]"  # decoded download
    partition_id: int
    num_partitions: int
    data_dir: str = ""
    state: Any = None                # Flower context.state (RecordDict), persistent per node

    @property
    def server_round(self) -> int:
        return int(self.config.get("server-round", 0))

    @property
    def seed(self) -> int:
        return int(self.cfg.seed * 1_000_003 + self.server_round * 1009 + self.partition_id)

    def data(self):
        return self.task.client_data(self.partition_id, self.num_partitions, self.data_dir)


@dataclass
class ClientResult:
    upload: "OrderedDict[str, np.ndarray]"
    num_examples: int
    metrics: dict[str, float]
