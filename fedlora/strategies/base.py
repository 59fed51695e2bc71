"""The server half every fedlora method shares: :class:`FedLoraStrategy`, a Flower ``FedAvg``
subclass assembled from named parts, and the hooks a method overrides.

One round: ``configure_train`` settles last round's downloads, asks new nodes for their tier and
partition (:class:`~.nodes.NodeDirectory`), samples, and encodes each node's download
(:class:`~.downlink.Downlink`); ``aggregate_train`` decodes every reply as hostile input
(:mod:`.replies`; a bad reply is dropped with its node id and reason), bounds each update's
influence (:mod:`.guard`), applies differential privacy or secure aggregation if configured and
hands the updates to the method's :meth:`aggregate_updates`; :meth:`FedLoraStrategy.start` is
the one run loop (fresh and resumed runs) and :meth:`FedLoraStrategy.end_round` writes each
round's record. The Flower round, the methods' hooks and the shared parts' checkpoint state
belong to one class; the parts live in their own modules.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from .. import straggler
from ..adapters import flocora_analytic_bits
from ..compression import Pipeline, codec_key, parse_spec
from ..config import RunConfig, split_list
from ..privacy import ServerPrivacy
from ..wire import (by_digest, decode_record, encode_record, message_bytes, payload_bytes,
                    payload_record)
from . import guard, stream
from .client import ClientResult, ClientRound  # noqa: F401  (re-exported for the methods)
from .downlink import Downlink
from .ledger import RoundStats, empty_record
from .mean import weighted_mean  # noqa: F401  (the one weighted mean; re-exported for methods)
from .nodes import NodeDirectory
from .protocol import TrainInstruction, Uploads, base_of
from .secure import SecureRounds
from .replies import (ADAPTER_KEY, CONFIG_KEY, METRICS_KEY, ClientUpdate,  # noqa: F401
                      MalformedReply, decode_reply, train_metrics)

log = logging.getLogger("flwr.fedlora")


def arrays_to_state(arrays: ArrayRecord) -> "OrderedDict[str, np.ndarray]":
    """Server-internal dense state (numpy Arrays) → ordered dict of float32 arrays."""
    return OrderedDict((k, np.asarray(arrays[k].numpy(), dtype=np.float32)) for k in arrays.keys())


def state_to_arrays(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v, dtype=np.float32)))
                                   for k, v in state.items()))


class RejectRound(Exception):
    """The round's aggregate must not be applied (the previous global model is kept and the
    method's state rolled back)."""


class FedLoraStrategy(FedAvg):
    """Common server half of every fedlora method. Subclasses implement
    :meth:`aggregate_updates` and may override the hooks below."""

    name = "base"
    adapter = True  # clients build the peft adapter model (False: the full model)
    #: what the method's replies can be (:class:`.protocol.Uploads`): weights only, weights or
    #: updates (``upload=delta``: the server adds the mean update to the global), updates always
    uploads: Uploads = Uploads.WEIGHTS
    #: how the method's server step weighs the uploads, when it is a function of their mean
    #: alone (then :mod:`.stream` can aggregate one reply at a time): ``"examples"`` (the
    #: weight-averaging methods: capped num-examples), ``"equal"`` (FLASC), None (not streamed)
    stream_weights: str | None = None

    def __init__(self, cfg: RunConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
        super().__init__(
            fraction_train=cfg.fraction_train, fraction_evaluate=0.0,
            min_train_nodes=cfg.min_train_nodes, min_available_nodes=cfg.min_available_nodes,
            arrayrecord_key=ADAPTER_KEY, configrecord_key=CONFIG_KEY,
        )
        self.cfg = cfg
        self.shapes = dict(shapes)
        # codec chains are parsed once, here (a bad spec fails at start, not in round 1)
        self.codec_up: Pipeline = parse_spec(cfg.codec_up)
        self.codec_down: Pipeline = parse_spec(cfg.codec_down)
        self.tier_codec_up = [parse_spec(x) for x in split_list(cfg.tier_codec_up)]
        self.tier_codec_down = [parse_spec(x) for x in split_list(cfg.tier_codec_down)]
        if cfg.client_sampling not in ("partition", "flower"):
            raise ValueError(f"run-config 'client-sampling' must be 'partition' or 'flower', "
                             f"got {cfg.client_sampling!r}")
        self.stats: dict[int, RoundStats] = {}
        self._global: "OrderedDict[str, np.ndarray] | None" = None
        #: trusted medians of update norms, one per applied round of >= 2 valid replies (the
        #: bound of a round of 1-2 replies: :meth:`round_norm_bound`; checkpointed)
        self.norm_history: list[float] = []
        #: tiers and partition-ids by node id, learnt with a query message; partition sampling
        self.nodes = NodeDirectory(cfg.seed, self.uses_tiers or self.samples_partitions,
                                   cfg.round_timeout)
        self.downlink = Downlink(cfg.download, cfg.codec_down_full, cfg.delta_max_nodes,
                                 by_digest(cfg.payload_table))
        if cfg.upload not in ("weights", "delta"):
            raise ValueError(f"run-config 'upload' must be 'weights' or 'delta', got {cfg.upload!r}")
        if cfg.upload == "delta" and self.uploads is Uploads.WEIGHTS:
            raise ValueError(f"{self.name} aggregates client weights; upload='delta' is for "
                             "flocora, fedavg, fl-lora and ffa-lora")
        #: replies are updates (trained − received), not weights
        self.replies_are_deltas = self.uploads.replies_are_deltas(cfg.upload)
        self._check_update_only_codecs()
        #: differential privacy (``dp-*``; inert when ``dp=off``): see :mod:`fedlora.privacy`
        self.privacy = ServerPrivacy.for_strategy(self)
        #: secure aggregation (``secure-aggregation``; None when off): see :mod:`.secure`
        self.secure = SecureRounds(self) if cfg.secure_aggregation else None
        #: the simulated clock of sync rounds (straggler.records_time) and the train nodes of
        #: the round being run that simulated-round-timeout cuts off (docs/async.md)
        self.sim_clock, self.sim_late = 0.0, set()
        self.keep_records(None)  # the ServerApp gives the recorder (round records: end_round)

    def _check_update_only_codecs(self) -> None:
        """A chain for updates only (``sign``, ``lowrank``) must never carry weights: uploads must
        be deltas, downloads ``download=delta`` with a ``codec-down-full`` that can carry
        weights."""
        def bad(pipe: Pipeline) -> bool:
            return pipe.for_updates_only

        for pipe in (self.codec_up, *self.tier_codec_up):
            if bad(pipe) and not self.replies_are_deltas:
                raise ValueError(f"codec-up {pipe.spec!r} encodes updates, not weights: use "
                                 f"upload='delta' ({self.name} uploads weights otherwise)")
        full = self.downlink.full_spec
        if full is not None and bad(full):
            raise ValueError(f"codec-down-full {full.spec!r} carries weights (a full download); "
                             "it encodes updates only")
        for pipe in (self.codec_down, *self.tier_codec_down):
            if bad(pipe) and self.downlink.mode != "delta":
                raise ValueError(f"codec-down {pipe.spec!r} encodes updates, not weights: use "
                                 "download='delta' (a full download carries the weights)")
            if bad(pipe) and bad(self.downlink.full_pipe(pipe)):
                raise ValueError(f"codec-down {pipe.spec!r} encodes updates, not weights: set "
                                 "codec-down-full (the codec of a full download, e.g. "
                                 "'affine:8|zstd'); its default is codec-down without the "
                                 "sparsifier")

    def ensure_no_sparsifier(self, up: bool = True, down: bool = False) -> None:
        """For methods that add their own sparsifier (``topk``/``ranks``) to the user's specs:
        those specs, per-tier ones included, must not sparsify."""
        pipes = ([self.codec_up, *self.tier_codec_up] if up else []) + \
                ([self.codec_down, *self.tier_codec_down] if down else [])
        for pipe in pipes:
            if pipe.value_coder.whole_body:  # drive, eden: one rotation of the whole update
                raise ValueError(f"{self.name} adds its own sparsifier, and codec spec "
                                 f"{pipe.spec!r} codes the whole update at once (it cannot "
                                 "follow a sparsifier)")
            if pipe.sparsifier is not None:
                raise ValueError(f"{self.name} adds its own sparsifier: codec spec {pipe.spec!r} "
                                 "must not sparsify")

    # ---------------------------------------------------------------- tiers
    @property
    def uses_tiers(self) -> bool:
        c = self.cfg
        return bool(c.tier_density or c.tier_codec_up or c.tier_codec_down or c.tier_rank)

    @property
    def samples_partitions(self) -> bool:
        return self.cfg.client_sampling == "partition"

    @property
    def tiers(self) -> dict[int, int]:
        return self.nodes.tiers

    @property
    def partitions(self) -> dict[int, int]:
        return self.nodes.partitions

    @property
    def excluded(self) -> dict[int, str]:
        """node id → why it is left out of partition sampling (its query answer was bad)."""
        return self.nodes.excluded

    def tier_of(self, node_id: int | None) -> int:
        return self.nodes.tier_of(node_id)

    def learn_tiers(self, grid: Grid, node_ids: list[int], stats: RoundStats) -> None:
        """Learn new nodes' tiers and partition-ids (:meth:`.NodeDirectory.learn`)."""
        self.nodes.learn(grid, node_ids, stats)
        if self.uses_tiers:
            log.info("tiers: %s", {n: self.tier_of(n) for n in node_ids})

    def sample_by_partition(self, server_round: int, all_nodes: list[int], k: int) -> list[int]:
        """Round ``server_round``'s sample (:meth:`.NodeDirectory.sample`)."""
        return self.nodes.sample(server_round, all_nodes, k)

    # ---------------------------------------------------------------- hooks for methods
    def download_state(self, server_round: int, state: "OrderedDict[str, np.ndarray]"
                       ) -> "OrderedDict[str, np.ndarray]":
        """What clients receive this round (before encoding)."""
        return state

    def download_pipeline(self, server_round: int, node_id: int | None) -> Pipeline:
        """The codec chain of ``node_id``'s download (its tier's ``tier-codec-down``, else
        ``codec-down``); methods compose onto it (e.g. ``.with_sparsifier(...)``). Keyed for
        rotating codecs (``drive``, ``eden``) by the round alone: one payload may serve
        several nodes."""
        pipe = _tiered(self.tier_codec_down, self.tier_of(node_id), self.codec_down)
        return pipe.keyed(codec_key(self.cfg.seed, server_round, "down")) if pipe.needs_key \
            else pipe

    def upload_pipeline(self, server_round: int, node_id: int | None) -> Pipeline:
        """The codec chain the server asks of ``node_id``'s upload (keyed by the round and
        :meth:`key_identity` for rotating codecs, as the node keys it: ``client_app``)."""
        pipe = _tiered(self.tier_codec_up, self.tier_of(node_id), self.codec_up)
        return pipe.keyed(codec_key(self.cfg.seed, server_round, "up",
                                    self.key_identity(node_id))) \
            if pipe.needs_key and node_id is not None else pipe

    def key_identity(self, node_id: int) -> int:
        """Who an upload's codec key names: the node's partition-id where the server has
        granted it one (the same in every run with the same seed, so runs repeat their
        records), else its node id (which Flower draws at random per simulation). Sent to the
        node as ``codec-key-id``; a node that keys otherwise sends a payload the server refuses
        (its key tag does not match)."""
        part = self.nodes.partitions.get(node_id, -1)
        return part if part >= 0 else node_id

    def download_variant(self, server_round: int, node_id: int | None) -> Any:
        """A hashable key when a node needs its own version of the download (e.g. its rank),
        else None; :meth:`apply_variant` builds it."""
        return None

    def apply_variant(self, download: "OrderedDict[str, np.ndarray]", variant: Any
                      ) -> "OrderedDict[str, np.ndarray]":
        return download

    def node_config(self, server_round: int, node_id: int) -> dict[str, Any]:
        """The method's own fields of ``node_id``'s :class:`.protocol.TrainInstruction`, by
        field name (e.g. ``{"rank_budget": 2}``)."""
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
        if self.downlink.delta:  # nodes converge to the exact global (server error feedback)
            return down
        return decode_record(encode_record(down, self.download_pipeline(server_round + 1, None)),
                             expected={k: v.shape for k, v in down.items()})

    # ---------------------------------------------------------------- Flower Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.settle_downloads(server_round - 1)
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
        # differential privacy: charge the round (this round's clip travels in the config)
        send, dp = self.privacy.round_config(server_round, len(node_ids), len(all_nodes))
        if not send:  # the round would exceed dp-target-epsilon: no more rounds
            return []
        secure: dict[Any, Any] = {}
        if self.secure is not None:  # SecAgg+ advertise and share stages (secure.py)
            secure = self.secure.setup(grid, server_round, node_ids, stats, len(all_nodes))
            node_ids = [n for n in node_ids if n in secure]
        download = self.download_state(server_round, self._global)
        targets: dict[Any, "OrderedDict[str, np.ndarray]"] = {}
        self.downlink.start_round()
        messages = []
        for node_id in node_ids:
            pipe = self.download_pipeline(server_round, node_id)
            variant = self.download_variant(server_round, node_id)
            if variant not in targets:
                targets[variant] = (download if variant is None
                                    else self.apply_variant(download, variant))
            dl = self.downlink.prepare(server_round, node_id, targets[variant], pipe, variant)
            record = payload_record(dl.payload)
            up = self.upload_pipeline(server_round, node_id)
            ins = TrainInstruction(
                server_round=server_round, method=self.name, codec_down=dl.spec,
                codec_up=up.spec, tier=self.tier_of(node_id),
                upload="delta" if self.replies_are_deltas else "weights",
                # rotating codecs (drive, eden) key the upload by the node's partition-id
                codec_key_id=self.key_identity(node_id) if up.needs_key else None,
                base_fingerprint=base_of(config), dp=dp,
                down=self.downlink.message_config(dl), secagg=secure.get(node_id),
                **self.node_config(server_round, node_id))
            msg = Message(content=RecordDict({ADAPTER_KEY: record, CONFIG_KEY: ins.to_config()}),
                          message_type=MessageType.TRAIN, dst_node_id=node_id)
            stats.sent[node_id] = message_bytes(msg)
            if not msg.metadata.message_id:  # as Flower's push sets it (a grid may replace it)
                msg.metadata.__dict__["_message_id"] = msg.object_id
            stats.asked[node_id] = msg.metadata  # its message_id: what the reply must answer
            stats.payload_down[node_id] = len(dl.payload)
            if dl.mode == "full" and self.downlink.delta:
                stats.full_downloads.append(node_id)
            messages.append(msg)
        if straggler.records_time(self.cfg):  # the simulated clock (docs/async.md)
            cost, late = straggler.sync_round(
                self.cfg, [self.partitions.get(n, -1) for n in node_ids], len(all_nodes))
            self.sim_clock += cost
            stats.extra["simulated_time"] = self.sim_clock
            self.sim_late = {node_ids[i] for i in late}
        return messages

    def settle_downloads(self, server_round: int) -> None:
        """Commit the download records of ``server_round``'s nodes whose replies decoded."""
        s = self.stats.get(server_round)
        if s is None or not self.downlink.delta:
            return
        self.downlink.settle(server_round, s.replied())

    # ---------------------------------------------------------------- hostile-node guards
    @property
    def robustness(self) -> guard.GuardSettings:
        """The run's robustness settings (``max-weight-ratio`` ... ``trim-fraction``), validated
        on first use. ``aggregation`` other than ``mean`` needs a weight-averaging method (one
        that accepts ``upload=delta``: fedavg, flocora, fl-lora, ffa-lora)."""
        if "_robustness" not in self.__dict__:
            self._robustness = guard.GuardSettings.from_config(
                self.cfg, self.name, robust_ok=self.uploads is Uploads.EITHER)
        return self._robustness

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: "Callable[[int, ArrayRecord], MetricRecord | None] | None" = None,
              first_round: int = 1) -> Result:
        """The one run loop, of fresh and resumed runs: Flower's ``Strategy.start`` steps for
        rounds ``first_round..num_rounds`` with the real round numbers (LoRA-A2's parity, the
        lr schedule and the clients' seeds depend on them); a fresh run (``first_round`` 1)
        first evaluates and records the initial model as round 0. Each round ends with
        :meth:`end_round` (central evaluation, checkpoint, the round's record). The robustness
        settings are validated first (a bad value fails before any training). Returns Flower's
        Result; its ``arrays`` is the final global model."""
        self.robustness  # noqa: B018  (validates)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays, t0 = Result(), initial_arrays, time.time()
        log.info("Starting %s: rounds %d to %d", type(self).__name__, first_round, num_rounds)
        if first_round <= 1:
            self.end_round(0, arrays, evaluate_fn, result)
        for rnd in range(max(int(first_round), 1), int(num_rounds) + 1):
            log.info("")
            log.info("[ROUND %s/%s]", rnd, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(rnd, arrays, train_config, grid), timeout=timeout)
            agg, metrics = self.aggregate_train(rnd, replies)
            if agg is not None:
                arrays = agg
            if metrics is not None:
                log.info("\t└──> Aggregated MetricRecord: %s", metrics)
                result.train_metrics_clientapp[rnd] = metrics
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(rnd, arrays, evaluate_config, grid),
                timeout=timeout)
            metrics = self.aggregate_evaluate(rnd, replies)
            if metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = metrics
            self.end_round(rnd, arrays, evaluate_fn, result)
        result.arrays = arrays
        log.info("Strategy execution finished in %.2fs", time.time() - t0)
        return result

    def robust_updates(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """With ``aggregation`` = ``median`` / ``trimmed-mean``: one pseudo-reply holding the
        coordinate-wise median / trimmed mean of the uploads, which the method's own averaging
        step then applies unchanged (the mean of one upload is that upload); else ``updates``."""
        g = self.robustness
        if g.aggregation == "mean":
            return updates
        agg = guard.robust_mean([u.tensors for u in updates], g.aggregation, g.trim_fraction)
        return [ClientUpdate(-1, agg, sum(u.weight for u in updates), {})]

    def expected_upload_spec(self, server_round: int, node_id: int | None) -> str:
        """The canonical ``codec-up`` the server asked of ``node_id`` this round (deterministic
        per round and node); a reply in any other codec is dropped."""
        return self.upload_pipeline(server_round, node_id).spec

    def update_reference(self, server_round: int, node_id: int
                         ) -> "Mapping[str, np.ndarray] | None":
        """What a node's upload is compared with to get its update: the model that node was
        sent — its copy after this round's delta download, else the broadcast global — or None
        for methods whose reply is itself the update."""
        if self.replies_are_deltas:
            return None
        sent = self.downlink.pending.get(node_id)
        if sent is not None and sent[0] == server_round and sent[1] is not None:
            return sent[1].state
        return self._global

    def validate_update(self, server_round: int, up: ClientUpdate) -> None:
        """Method-specific checks of a decoded reply (raise MalformedReply to drop it)."""

    def rollback(self, server_round: int) -> None:
        """Undo whatever :meth:`aggregate_updates` changed in the method's own state this round
        (called when the round's aggregate is not applied)."""

    def bound_updates(self, server_round: int, updates: list[ClientUpdate],
                      stats: "RoundStats") -> list[ClientUpdate]:
        """Bound each valid reply's influence (see :mod:`.guard`): cap its aggregation weight,
        then clip (or reject) an update whose L2 norm is over the round's bound. Returns the
        replies to aggregate; capped weights and clipped norms go to ``stats``."""
        g = self.robustness
        if not updates:
            return updates
        guard.cap_reply_weights(updates, g, stats)
        measured = []
        for u in updates:
            try:
                ref = self.update_reference(server_round, u.node_id)
                n = guard.update_norm(u.tensors, ref)
                if not math.isfinite(n):
                    raise MalformedReply(f"update norm {n} is not finite")
                measured.append((u, ref, n))
            except Exception as err:
                stats.drop(u.node_id, err)
        scales = self.bound_round(server_round, [(u.node_id, n) for u, _, n in measured], stats)
        kept = []
        for (u, ref, n), scale in zip(measured, scales):
            if scale is None:
                continue
            if scale < 1.0:
                u.tensors = guard.clip_update(u.tensors, scale, ref)
            kept.append(u)
        return kept

    def bound_round(self, server_round: int, norms: "list[tuple[Any, float]]",
                    stats: "RoundStats") -> "list[float | None]":
        """The one bounding step of a round, for both aggregation paths: the round's bound from
        its valid replies' ``(node, norm)`` (:meth:`round_norm_bound`, kept in
        ``stats.norm_bound``), then each reply against it (:func:`.guard.apply_bound`): 1.0,
        its clip factor, or None (rejected, dropped into ``stats``), in the replies' order."""
        bound = stats.norm_bound = self.round_norm_bound(server_round, [n for _, n in norms])
        return [guard.apply_bound(self.robustness, stats, node, n, bound) for node, n in norms]

    def round_norm_bound(self, server_round: int, norms: list[float]) -> float | None:
        """The round's bound on an update's norm, from its valid replies' ``norms``:
        ``update-norm-bound``, else ``norm-bound-factor`` × their lower median (≥ 3 replies),
        else (1–2 replies) the trusted bound (:func:`.guard.trusted_bound`: earlier rounds'
        medians and, with 2 replies, the smaller norm; else ``norm-bound-global`` × the
        global's norm). The norms are kept in the
        round's stats: an applied round adds their median to :attr:`norm_history`."""
        g = self.robustness
        s = self.stats.get(server_round)
        if s is not None:
            s.update_norms = list(norms)
        bound = guard.norm_bound(norms, g.update_norm_bound, g.norm_bound_factor)
        if bound is None and norms:
            bound = guard.trusted_bound(
                self.norm_history, g.norm_bound_factor, g.norm_bound_history,
                g.norm_bound_global,
                lambda: guard.update_norm(self._global) if self._global else 0.0,
                current=guard.trusted_median(norms))
        return bound

    def _trust_round(self, server_round: int) -> None:
        """An applied round's median update norm joins the trusted history (rounds of ≥ 2
        valid replies; the last ``norm-bound-history`` are kept)."""
        s = self.stats.get(server_round)
        m = guard.trusted_median(s.update_norms) if s is not None else None
        if m is not None:
            keep = max(int(self.robustness.norm_bound_history), 1)
            self.norm_history = (self.norm_history + [m])[-keep:]

    @property
    def checks_updates(self) -> bool:
        """Whether the method adds checks of its own to each decoded update (it overrides
        :meth:`validate_update`): streaming's flat path applies only without them."""
        return type(self).validate_update is not FedLoraStrategy.validate_update

    def decode_reply(self, server_round: int, msg: Message) -> ClientUpdate:
        """Validate and decode one reply (:func:`.replies.decode_reply` with the codec asked of
        that node and this round's shapes), then the method's own checks."""
        node = msg.metadata.src_node_id
        up = decode_reply(msg, self.upload_pipeline(server_round, node),
                          self.upload_shapes(server_round))
        self.validate_update(server_round, up)
        return up

    def decode_all(self, server_round: int, replies: list[Message], stats: "RoundStats"
                   ) -> list[ClientUpdate]:
        """Every reply decoded and checked (:meth:`decode_reply`); a bad one is dropped."""
        updates = []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                up = self.decode_reply(server_round, msg)
                stats.payload_up[node] = payload_bytes(msg.content.array_records[ADAPTER_KEY])
                stats.params_up[node] = int(up.reply.params_up or 0)
                updates.append(up)
            except Exception as err:  # node input never takes the ServerApp down
                stats.drop(node, err)
        return updates

    def stray_reason(self, server_round: int, stats: "RoundStats", node: Any, msg: Message,
                     seen: set) -> str:
        """Why ``msg`` is not ``node``'s answer to this round ('' when it is): a reply names the
        message it answers (``reply_to_message_id``, and that message names its round), so a
        reply from a node not sent a train message this round, one answering another message
        (an earlier round's: stale; or none: forged) and a second reply are told apart from
        the node's own reply, without relying on Flower's checks."""
        if stats.asked and node not in stats.asked:
            return "the node was not sent a train message this round"
        meta = stats.asked.get(node)
        want = meta.message_id if meta is not None else ""
        got = msg.metadata.reply_to_message_id
        if want and got != want:
            for r in range(server_round - 1, max(server_round - 4, 0), -1):
                old = self.stats.get(r)
                if old is not None and got and any(m.message_id == got
                                                   for m in old.asked.values()):
                    return f"a stale reply: it answers round {r}'s train message"
            return (f"answers message {got[:16]!r}…, not this round's train message to the "
                    f"node ({want[:16]}…): stale or forged")
        if node in seen:
            return "a second reply from this node in the round"
        return ""

    @staticmethod
    def reply_node(stats: "RoundStats", msg: Message) -> Any:
        """The node a reply stands for: its source, except for the error reply the SuperLink
        itself writes when a node it sent a message to is lost (source ``SUPERLINK_NODE_ID``):
        that one stands for the node whose train message it answers, when there is one."""
        src = msg.metadata.src_node_id
        if src == SUPERLINK_NODE_ID and msg.has_error():
            got = msg.metadata.reply_to_message_id
            for node, meta in stats.asked.items():
                if got and meta.message_id == got:
                    return node
        return src

    def _stray(self, stats: "RoundStats", server_round: int, node: Any, msg: Message,
               why: str) -> None:
        """Record a reply that is not its node's answer to this round: its reason and its wire
        bytes apart (``bytes_up_dropped``); it neither counts as the node's reply nor
        unsettles the node's download record."""
        try:
            size = message_bytes(msg, hashed=False)
        except Exception:  # a reply that cannot even be measured counts 0 bytes
            size = 0
        stats.stray.append({"node": node, "reason": f"MalformedReply: {why}", "bytes": size})
        log.warning("round %d: dropped a reply from node %s: %s", server_round, node, why)

    def canonical_order(self, replies: Iterable[Message]) -> list[Message]:
        """The round's replies by partition-id, then node id (:meth:`.NodeDirectory.order_key`),
        not in the order they arrived: every sum over them (float64 means, DP's clipped sum,
        LoRA-A2's and FlexLoRA's products) and the record's per-node order are then the same
        in every run, however the machine's load ordered the replies. Stable: two replies of
        one node keep their arrival order (the second is dropped)."""
        def key(msg: Message) -> tuple[int, int]:
            try:
                return self.nodes.order_key(msg.metadata.src_node_id)
            except Exception:  # a reply without metadata is dropped later; it sorts last
                return (1 << 63, -1)
        return sorted(replies, key=key)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and validate each reply (a bad one is dropped with its node id and reason,
        whatever it raises), bound the valid ones' influence (:meth:`bound_updates`), aggregate
        — or, for methods with ``stream_weights`` under ``aggregation=mean`` and no central DP,
        the same one reply at a time into a running sum (:mod:`.stream`). A non-finite aggregate
        or any failure of the method's step keeps the previous global model and rolls the
        method's state back (:meth:`rollback`)."""
        stats = self.stats.setdefault(server_round, RoundStats(server_round))
        accepted: list[Message] = []
        seen: set[Any] = set()
        for msg in self.canonical_order(replies):
            node = None
            try:
                node = self.reply_node(stats, msg)
                why = self.stray_reason(server_round, stats, node, msg, seen)
                if why:  # not this round's answer: dropped apart, the node's own reply stands
                    self._stray(stats, server_round, node, msg, why)
                    continue
                seen.add(node)
                if node in self.sim_late:  # simulated-round-timeout
                    stats.failures.append({"node": node, "reason": "simulated timeout: task cost "
                                           f"> simulated-round-timeout "
                                           f"{self.cfg.simulated_round_timeout:g}"})
                    continue
                if msg.has_error():
                    reason = msg.error.reason
                    # the exception itself is at the end of a traceback: keep the tail
                    stats.failures.append({"node": node, "reason": str(reason)[-800:]})
                    log.warning("round %d: node %s failed: %s", server_round, node,
                                str(reason)[-400:])
                    continue
                stats.received[node] = message_bytes(msg, hashed=False)  # received: no chunk hashed
                accepted.append(msg)
            except Exception as err:  # node input never takes the ServerApp down
                stats.drop(node, err)
        streaming = stream.streams(self) and self.secure is None
        try:
            if self.secure is not None:  # unmask stage: the survivors' mean, one pseudo-reply
                updates, mean = self.secure.aggregate(server_round, accepted, stats)
            elif streaming:  # decode → check → add → free, one reply at a time (stream.py)
                updates, mean = stream.stream_mean(self, server_round, accepted, stats)
            else:
                updates = self.bound_updates(server_round, self.decode_all(server_round,
                                                                           accepted, stats),
                                             stats)
        except Exception as err:  # pragma: no cover - defence in depth
            log.exception("round %d: bounding the updates failed", server_round)
            stats.rejected = f"{type(err).__name__}: {err}"[:500]
            return None, None
        stats.clients = len(updates)
        stats.aggregated = [u.node_id for u in updates]
        log.info("aggregate_train: round %d, %d valid, %d failed, %d dropped, %d clipped%s",
                 server_round, len(updates), len(stats.failures), len(stats.dropped),
                 len(stats.clipped), " (streamed)" if streaming else "")
        if not updates or self._global is None:
            return None, None
        try:
            if streaming or self.secure is not None:
                to_aggregate = [mean]
            else:
                # central DP: clipped sum + noise over the fixed denominator, as one pseudo-reply
                to_aggregate = self.robust_updates(self.privacy.server_step(server_round,
                                                                            updates))
            new_state = self.aggregate_updates(server_round, self._global, to_aggregate)
            for k, v in new_state.items():
                if not np.all(np.isfinite(v)):
                    raise RejectRound(f"aggregate of {k} is not finite")
        except Exception as err:
            stats.rejected = f"{type(err).__name__}: {err}"[:500]
            if isinstance(err, RejectRound):
                log.error("round %d: %s; keeping the previous global model", server_round, err)
            else:
                log.exception("round %d: aggregation failed; keeping the previous global model",
                              server_round)
            self.rollback(server_round)
            return None, None
        self._trust_round(server_round)
        stats.train_metrics = train_metrics(updates)
        to_aggregate = mean = None  # the float64 mean (2x the model) goes before the copy out
        return state_to_arrays(new_state), MetricRecord(stats.train_metrics)

    # ---------------------------------------------------------------- checkpoints (resume)
    def state_dict(self) -> dict[str, Any]:
        """What this strategy needs, besides the global tensors and the run config, to run the
        round after the last one it aggregated (see :mod:`fedlora.checkpoint`): node tiers, the
        partition map, the nodes excluded from sampling and the downlink's per-node copies, all
        by node id. The copies sent in the last round are settled here as the next round's
        ``configure_train`` would settle them. Methods with state of their own extend it."""
        last = max(self.stats, default=0)
        s = self.stats.get(last)
        ok: list[int] = sorted(s.replied()) if s is not None and self.downlink.delta else []
        dl = self.downlink
        return {
            "method": self.name,
            **self.nodes.state_dict(),
            "norm_history": list(self.norm_history),
            **({"secure": self.secure.state_dict()} if self.secure is not None else {}),
            **({"sim_clock": self.sim_clock} if straggler.records_time(self.cfg) else {}),
            "downlink": {
                "held": [(n, c.state, c.digest) for n, c in dl.held.items()],  # LRU order
                "pending": [(n, rnd, c.state, c.digest) for n, (rnd, c) in dl.pending.items()],
                "settle": (last, ok),
                "init_refused": sorted(dl.init_refused),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`, on a strategy freshly built with the same config.
        Node ids are kept as saved: in deployment nodes keep their ids across a ServerApp or
        SuperLink restart; after a simulation restart they have new ids, so the saved entries
        simply never match (tiers and partitions are asked again, the downlink serves the
        unknown nodes in full)."""
        from .downlink import Copy, digest

        def copy(st) -> Copy:  # digests recomputed: checkpoints from before they were
            st = OrderedDict(st)  # order-free (2026-12-01) resume with matching ones
            return Copy(st, digest(st))

        if state.get("method") != self.name:
            raise ValueError(f"checkpoint of method {state.get('method')!r}, not {self.name!r}")
        self.nodes.load_state_dict(state)
        self.norm_history = [float(x) for x in state.get("norm_history", [])]
        if "sim_clock" in state:
            self.sim_clock = float(state["sim_clock"])
        if self.secure is not None:
            self.secure.load_state_dict(state.get("secure", {}))
        dl, saved = self.downlink, state["downlink"]
        dl.held = OrderedDict((int(n), copy(st)) for n, st, _ in saved["held"])
        dl.pending = {int(n): (int(rnd), copy(st)) for n, rnd, st, _ in saved["pending"]}
        dl.init_refused = {int(n) for n in saved.get("init_refused", [])}
        last, ok = saved["settle"]
        if dl.delta:
            dl.settle(int(last), {int(n) for n in ok})

    # ---------------------------------------------------------------- records
    def keep_records(self, recorder: Any, analytic_bytes_per_upload: float = 0.0,
                     save: "Callable[[int, ArrayRecord, list[dict]], Any] | None" = None
                     ) -> None:
        """Where the strategy writes each round's record (``recorder``:
        :class:`fedlora.results.Recorder` → ``rounds.jsonl``/CSV/TensorBoard), the analytic
        upload size per reply it adds to it, and ``save(round, arrays, records)``: the round's
        checkpoint, written before the record (see :meth:`end_round`)."""
        self._recorder, self._analytic_up, self._save = recorder, analytic_bytes_per_upload, save

    def end_round(self, server_round: int, arrays: ArrayRecord,
                  evaluate_fn: "Callable[[int, ArrayRecord], MetricRecord | None] | None" = None,
                  result: Result | None = None) -> MetricRecord | None:
        """The last step of a round (round 0: the initial model): ``evaluate_fn`` (the
        ServerApp's central evaluation, nothing else), then for rounds ≥ 1 the checkpoint, then
        the round's record — the ledger's bytes and counts, the DP accounting and the
        evaluation's metrics — to the recorder (:meth:`keep_records`)."""
        metrics = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
        if metrics is not None:
            log.info("\t└──> MetricRecord: %s", metrics)
            if result is not None:
                result.evaluate_metrics_serverapp[server_round] = metrics
        if self._recorder is not None:
            def save(records: list[dict]) -> Any:
                return self._save(server_round, arrays, records)
            self._recorder.log_round({**self.round_record(server_round), **(metrics or {})},
                                     checkpoint=save if server_round >= 1 and self._save else None)
        return metrics

    def round_record(self, server_round: int) -> dict[str, Any]:
        """The record of ``server_round`` (:meth:`.RoundStats.record`) with the analytic upload
        size and the DP accounting."""
        s = self.stats.get(server_round)
        if s is None:
            rec = empty_record(server_round)
        else:  # + dp_epsilon, ... ({} when dp=off)
            rec = {**s.record(self.tier_of, self.partitions), **self.privacy.record(server_round),
                   **(self.secure.record(server_round) if self.secure is not None else {})}
        if s is not None and self.tier_codec_up and s.clients is not None:
            rec["analytic_bytes_up"] = sum(self.analytic_upload_bytes(server_round, n)
                                           for n in s.aggregated)
        else:
            rec["analytic_bytes_up"] = self._analytic_up * rec["clients"]
        return rec

    def analytic_upload_bytes(self, server_round: int, node_id: Any) -> float:
        """FLoCoRA's analytic size of ``node_id``'s upload (:func:`fedlora.adapters.
        flocora_analytic_bits` at the ``affine:b`` width of the chain asked of it — its tier's
        ``tier-codec-up`` — else 32 bits), in bytes."""
        coder = self.upload_pipeline(server_round, node_id).value_coder
        bits = int(coder.bits) if coder.codec_id == "affine" else 32
        zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in self.shapes.items()}
        return flocora_analytic_bits(zeros, bits) / 8


def averaged(strategy: FedLoraStrategy, state: "OrderedDict[str, np.ndarray]",
             updates: list[ClientUpdate]) -> "OrderedDict[str, np.ndarray]":
    """FedAvg's server step for weight-averaging methods: the weighted mean of the clients'
    weights, or with ``upload=delta`` the global plus the weighted mean of their updates (the
    same model when nothing is lost; far less codec error, since updates are small)."""
    mean = weighted_mean(updates)
    if not strategy.replies_are_deltas:
        return mean
    return OrderedDict((k, (state[k] + mean[k]).astype(np.float32) if k in mean else state[k])
                       for k in state)


def _tiered(per_tier: list[Pipeline], tier: int, default: Pipeline) -> Pipeline:
    """Entry ``tier`` of a per-tier list (the last one for higher tiers), else ``default``."""
    return per_tier[min(max(tier, 0), len(per_tier) - 1)] if per_tier else default
