"""Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022): the second run loop, beside
:meth:`.base.FedLoraStrategy.start`, for ``aggregation-mode=async`` (docs/async.md).

:class:`AsyncLoop` keeps ``concurrency`` nodes training through Flower's Message API
(``grid.push_messages`` / ``grid.pull_messages``); a train message is built as a round builds
it (a delta download from the version the node holds). Each reply is matched to its task (else
stray), checked for staleness (over ``staleness-limit``: dropped with its reason) and decoded by
the strategy's own :meth:`~.base.FedLoraStrategy.decode_reply` into the buffer; the freed node
gets new work at once. Every ``buffer-size`` replies :meth:`AsyncLoop.step` bounds them
(:meth:`~.base.FedLoraStrategy.bound_updates`), scales each by 1/√(1+s), applies central DP and
the method's :meth:`aggregate_updates` (global + Σ n_i/N · w(s_i)·Δ_i), then records it
(:meth:`~.base.FedLoraStrategy.end_round`: evaluation, checkpoint with :meth:`AsyncLoop.
state_dict`, record). ``async-order=simulated`` processes replies in simulated completion order
(same seed, same records); ``arrival`` as they come.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..straggler import task_cost
from ..wire import message_bytes, payload_bytes, payload_record
from .base import ADAPTER_KEY, CONFIG_KEY, FedLoraStrategy, RejectRound, arrays_to_state, \
    state_to_arrays
from .ledger import RoundStats
from .protocol import DPInstruction, TrainInstruction, Uploads, base_of
from .replies import ClientUpdate, train_metrics

log = logging.getLogger("flwr.fedlora")

#: seconds between two pulls when nothing arrived
PULL_INTERVAL = 0.05
#: why a reply that answers no task in flight to its source node is stray
NOT_IN_FLIGHT = "it answers no train message in flight to this node: stale, second or forged"


class StaleReply(ValueError):
    """A reply trained on a global more than ``staleness-limit`` versions old."""


def staleness_weight(kind: str, s: int) -> float:
    """The scale of an update of staleness ``s``: 1/√(1+s) (``sqrt``, FedBuff's) or 1."""
    if kind == "sqrt":
        return 1.0 / math.sqrt(1.0 + s)
    if kind == "constant":
        return 1.0
    raise ValueError(f"run-config 'staleness-weight' must be 'sqrt' or 'constant', got {kind!r}")


@dataclass
class Task:
    """One train message in flight."""

    node: int
    step: int           # the version its update is for (its train message's server-round)
    version: int        # the global version it was sent (what it trains on)
    message_id: str
    sent_at: float      # time.time()
    due: float          # simulated completion time (async-order=simulated)
    seq: int            # dispatch number (ties)


@dataclass
class Buffered:
    """One accepted reply, decoded, waiting for the step."""

    update: ClientUpdate
    staleness: int
    task: Task


@dataclass
class AsyncLoop:
    """The async run loop around a built strategy (see the module docstring)."""

    strategy: FedLoraStrategy
    version: int = 0
    buffer: list[Buffered] = field(default_factory=list)
    in_flight: dict[str, Task] = field(default_factory=dict)     # message id → task
    clock: float = 0.0                                           # simulated time
    seq: int = 0

    def __post_init__(self) -> None:
        s, cfg = self.strategy, self.strategy.cfg
        if s.uploads is not Uploads.EITHER or not s.replies_are_deltas or \
                s.stream_weights != "examples":
            raise ValueError(f"aggregation-mode='async' needs fedavg, flocora, fl-lora or "
                             f"ffa-lora with upload='delta', not {s.name} with "
                             f"upload={cfg.upload!r}")
        if s.secure is not None:
            raise ValueError("aggregation-mode='async' does not support secure-aggregation")
        self.k = int(cfg.buffer_size)
        self.limit = int(cfg.staleness_limit)
        self.weight_kind = str(cfg.staleness_weight)
        staleness_weight(self.weight_kind, 0)  # validates
        if self.k < 1 or self.limit < 0:
            raise ValueError("run-config 'buffer-size' must be >= 1 and 'staleness-limit' >= 0")
        if cfg.async_order not in ("arrival", "simulated"):
            raise ValueError(f"run-config 'async-order' must be 'arrival' or 'simulated', got "
                             f"{cfg.async_order!r}")
        self.simulated = cfg.async_order == "simulated"
        self.idle: deque[int] = deque()
        self.deferred: list[int] = []      # DP: nodes with a reply in the buffer wait for the step
        self.backoff: list[int] = []       # nodes that failed or timed out: asked again after it
        self.progress_at = time.time()     # last accepted reply
        self.arrived: dict[str, Message] = {}
        self.step_open = True                  # False: DP's budget refuses the next step
        self.step_dp: DPInstruction | None = None
        self.train_config = ConfigRecord()
        self.num_nodes = 0
        self.num_steps = 1 << 62
        self.evaluate_fn: "Callable[[int, ArrayRecord], MetricRecord | None] | None" = None
        self.result: Result | None = None
        self.failed = ""                       # why run() stopped early ("" : it did not)
        s.async_state = self.state_dict  # checkpoints (fedlora.checkpoint.server_state) call it

    # ------------------------------------------------------------------ bookkeeping
    def stats(self) -> RoundStats:
        """The ledger of the step being filled (version + 1)."""
        v = self.version + 1
        st = self.strategy.stats.get(v)
        if st is None:
            st = self.strategy.stats[v] = RoundStats(v)
            st.extra = {"version": v, "accepted": 0, "stale_dropped": 0, "staleness_hist": {},
                        "messages_down": 0, "messages_up": 0}  # a node may be served twice
        return st

    def cost(self, node: int) -> float:
        return task_cost(self.strategy.cfg, self.strategy.partitions.get(node, -1),
                         self.num_nodes)

    # ------------------------------------------------------------------ downlink
    def dispatch(self, grid: Grid, node: int) -> None:
        """Send ``node`` a train message for the next version: its download from the version
        it holds, built as :meth:`.FedLoraStrategy.configure_train` builds a round's."""
        s, st = self.strategy, self.stats()
        step = self.version + 1
        target = s.download_state(step, s._global)
        variant = s.download_variant(step, node)
        if variant is not None:
            target = s.apply_variant(target, variant)
        dl = s.downlink.prepare(step, node, target, s.download_pipeline(step, node), variant)
        up = s.upload_pipeline(step, node)
        ins = TrainInstruction(
            server_round=step, method=s.name, codec_down=dl.spec, codec_up=up.spec,
            tier=s.tier_of(node), upload="delta",
            codec_key_id=s.key_identity(node) if up.needs_key else None,
            base_fingerprint=base_of(self.train_config), dp=self.step_dp,
            down=s.downlink.message_config(dl), **s.node_config(step, node))
        msg = Message(content=RecordDict({ADAPTER_KEY: payload_record(dl.payload),
                                          CONFIG_KEY: ins.to_config()}),
                      message_type=MessageType.TRAIN, dst_node_id=node)
        size = message_bytes(msg)
        if not msg.metadata.message_id:  # as Flower's push sets it (a grid may replace it)
            msg.metadata.__dict__["_message_id"] = msg.object_id
        ids = list(grid.push_messages([msg]))
        mid = ids[0] if ids and ids[0] else ""
        if not mid:
            st.failures.append({"node": node, "reason": "the train message could not be pushed"})
            s.downlink.settle_node(node, False)
            self.backoff.append(node)  # asked again after the next step, not dropped for good
            log.warning("async: the train message to node %s could not be pushed", node)
            return
        st.sent[node] = st.sent.get(node, 0) + size
        st.extra["messages_down"] += 1
        st.payload_down[node] = st.payload_down.get(node, 0) + len(dl.payload)
        st.asked[node] = msg.metadata
        if dl.mode == "full" and s.downlink.delta:
            st.full_downloads.append(node)
        self.seq += 1
        self.in_flight[mid] = Task(node, step, self.version, mid, time.time(),
                                   self.clock + self.cost(node), self.seq)

    def fill(self, grid: Grid, concurrency: int) -> None:
        if not self.step_open:  # DP's budget refused the next step: no task without its DP
            return
        busy = {t.node for t in self.in_flight.values()}
        while self.idle and len(self.in_flight) < concurrency:
            node = self.idle.popleft()
            if node in busy:
                continue
            self.dispatch(grid, node)
            busy.add(node)

    # ------------------------------------------------------------------ uplink
    def receive(self, msg: Message) -> None:
        """Keep a pulled reply until its turn. Stray at once: a reply that answers no task in
        flight to its source node (stale, forged: another node's task) and a second reply to
        one message. The source is checked before the reply is kept, so a forged reply to
        another node's task cannot take the place of that node's own reply."""
        node: Any = None
        try:
            node, task = self._task_of(msg)
            mid = msg.metadata.reply_to_message_id or ""
            if task is None or task.node != node:
                self._stray(self.stats(), node, msg, NOT_IN_FLIGHT)
            elif mid in self.arrived:  # the first reply to a message stands
                self._stray(self.stats(), node, msg, "a second reply to one train message")
            else:
                self.arrived[mid] = msg
        except Exception as err:  # pragma: no cover - defence in depth (metadata unreadable)
            self._stray(self.stats(), node, msg, f"unreadable reply: {type(err).__name__}")

    def _task_of(self, msg: Message) -> tuple[Any, Task | None]:
        """A reply's source node and the task in flight it answers (None: none); the
        SuperLink's error reply for a lost node counts as that node's."""
        node = msg.metadata.src_node_id
        task = self.in_flight.get(msg.metadata.reply_to_message_id or "")
        if task is not None and node == SUPERLINK_NODE_ID and msg.has_error():
            node = task.node
        return node, task

    def process(self, grid: Grid, concurrency: int) -> None:
        """Process the replies whose turn has come (see the module docstring: ``arrival``: all
        that arrived, in canonical node order; ``simulated``: while the task due first in
        simulated time has its reply), stepping the global as the buffer fills; each freed node
        is sent new work at once, before the next reply is processed (so what it is sent — the
        version, the simulated start time — does not depend on how the pulls batched the
        replies)."""
        s = self.strategy
        if not self.simulated:
            got = [self.arrived.pop(m) for m in list(self.arrived)]
            for msg in s.canonical_order(got):
                if self.version >= self.num_steps or not self.step_open:
                    return
                self.on_reply(msg)
                if self.version < self.num_steps:
                    self.fill(grid, concurrency)
            return
        while self.in_flight and self.version < self.num_steps and self.step_open:
            first = min(self.in_flight.values(),
                        key=lambda t: (t.due, s.nodes.order_key(t.node), t.seq))
            msg = self.arrived.pop(first.message_id, None)
            if msg is None:
                return
            self.clock = max(self.clock, first.due)
            self.on_reply(msg)
            if self.version < self.num_steps:
                self.fill(grid, concurrency)

    def on_reply(self, msg: Message) -> None:
        """One reply: matched to its task, staleness-checked, decoded into the buffer (or
        dropped with its reason); the node goes back to the idle queue; a full buffer steps."""
        s, st = self.strategy, self.stats()
        node: Any = None
        try:
            node, task = self._task_of(msg)
            if task is None or task.node != node:  # its task expired since it was kept
                self._stray(st, node, msg, NOT_IN_FLIGHT)
                return
            del self.in_flight[task.message_id]
            free = True
            try:
                if msg.has_error():
                    st.failures.append({"node": node, "reason": str(msg.error.reason)[-800:]})
                    log.warning("async: node %s failed: %s", node, str(msg.error.reason)[-400:])
                    s.downlink.settle_node(node, False)
                    self.backoff.append(node)
                    free = False
                    return
                st.received[node] = st.received.get(node, 0) + message_bytes(msg, hashed=False)
                st.extra["messages_up"] += 1
                staleness = self.version - task.version
                if staleness > self.limit:
                    s.downlink.settle_node(node, True)  # it answered: it holds what it was sent
                    st.extra["stale_dropped"] += 1
                    st.drop(node, StaleReply(
                        f"trained on version {task.version}, the global is at {self.version}: "
                        f"staleness {staleness} > staleness-limit {self.limit}"))
                    if s.privacy.enabled:  # it released an update: one per node per step
                        # (this cannot stall the buffer: the K nodes of the last step were sent
                        # the current version, so their next replies are not stale)
                        self.deferred.append(node)
                        free = False
                    return
                try:
                    up = s.decode_reply(task.step, msg)
                except Exception as err:  # node input never takes the ServerApp down
                    s.downlink.settle_node(node, False)
                    st.drop(node, err)
                    # asked again after the next step, as a failed node: a node that answers
                    # garbage at once is not served in a tight loop, and a run whose every
                    # node does so ends after round-timeout instead of spinning
                    self.backoff.append(node)
                    free = False
                    return
                s.downlink.settle_node(node, True)
                st.payload_up[node] = st.payload_up.get(node, 0) + payload_bytes(
                    msg.content.array_records[ADAPTER_KEY])
                st.params_up[node] = st.params_up.get(node, 0) + int(up.reply.params_up or 0)
                self.buffer.append(Buffered(up, staleness, task))
                st.extra["accepted"] += 1
                self.progress_at = time.time()
                if s.privacy.enabled:  # one reply per node per step: the sum's sensitivity is C
                    self.deferred.append(node)
                    free = False
            finally:
                if free:
                    self.idle.append(node)
        except Exception as err:  # pragma: no cover - defence in depth
            st.drop(node, err)
            return
        if len(self.buffer) >= self.k:
            self.step()

    def _stray(self, st: RoundStats, node: Any, msg: Message, why: str) -> None:
        try:
            size = message_bytes(msg, hashed=False)
        except Exception:
            size = 0
        st.stray.append({"node": node, "reason": f"MalformedReply: {why}", "bytes": size})
        log.warning("async: dropped a reply from node %s: %s", node, why)

    def expire(self, timeout: float) -> None:
        """Tasks with no reply after ``round-timeout`` seconds: failures; the node is asked again
        later (a late reply is then stray)."""
        now, st = time.time(), self.stats()
        for mid, t in list(self.in_flight.items()):
            if now - t.sent_at > timeout:
                del self.in_flight[mid]
                st.failures.append({"node": t.node, "reason": f"no reply within round-timeout "
                                                              f"{timeout:g} s"})
                self.strategy.downlink.settle_node(t.node, False)
                self.backoff.append(t.node)

    # ------------------------------------------------------------------ the step
    def step(self) -> None:
        """Step the global with the buffer (see the module docstring) and write the record."""
        s, st = self.strategy, self.stats()
        v = self.version + 1
        batch, self.buffer = self.buffer, []
        hist: dict[str, int] = {}
        for b in batch:
            hist[str(b.staleness)] = hist.get(str(b.staleness), 0) + 1
        st.extra["staleness_hist"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
        st.extra["staleness_mean"] = float(np.mean([b.staleness for b in batch])) if batch else 0.0
        st.extra["staleness_max"] = max((b.staleness for b in batch), default=0)
        st.extra["in_flight"] = len(self.in_flight)
        if self.simulated:
            st.extra["simulated_time"] = self.clock
        staleness = {id(b.update): b.staleness for b in batch}
        new_state = None
        try:
            updates = s.bound_updates(v, [b.update for b in batch], st)
            for u in updates:
                w = staleness_weight(self.weight_kind, staleness[id(u)])
                if w != 1.0:
                    u.tensors = OrderedDict((k, (t * np.float32(w)).astype(np.float32))
                                            for k, t in u.tensors.items())
            st.clients = len(updates)
            st.aggregated = [u.node_id for u in updates]
            if updates:
                to_aggregate = s.robust_updates(s.privacy.server_step(v, updates))
                new_state = s.aggregate_updates(v, s._global, to_aggregate)
                for k, t in new_state.items():
                    if not np.all(np.isfinite(t)):
                        raise RejectRound(f"aggregate of {k} is not finite")
                s._trust_round(v)
                st.train_metrics = train_metrics(updates)
        except Exception as err:
            st.rejected = f"{type(err).__name__}: {err}"[:500]
            log.error("async step %d: %s; keeping the previous global model", v, st.rejected)
            s.rollback(v)
            new_state = None
        if new_state is not None:
            s._global = OrderedDict((k, np.asarray(t, np.float32)) for k, t in new_state.items())
        self.version = v
        s.downlink.start_round()  # the target changed: no download encoded before is reused
        self.idle.extend(self.deferred + self.backoff)
        self.deferred, self.backoff = [], []
        # the step's record, evaluation and checkpoint, here: the buffer is empty, the version
        # and every ledger are those of this step (what a resume continues from)
        s.end_round(v, state_to_arrays(s._global), self.evaluate_fn, self.result)
        if self.result is not None and st.train_metrics:
            self.result.train_metrics_clientapp[v] = MetricRecord(st.train_metrics)
        if v < self.num_steps:
            self._open_step()

    # ------------------------------------------------------------------ the loop
    def run(self, grid: Grid, initial_arrays: ArrayRecord, num_steps: int, timeout: float,
            train_config: ConfigRecord | None = None,
            evaluate_fn: "Callable[[int, ArrayRecord], MetricRecord | None] | None" = None,
            first_step: int = 1) -> Result:
        """Run steps ``first_step..num_steps`` of the global (the run's ``num-server-rounds``;
        ``first_step`` > 1: a resumed run, :meth:`resume`); each one ends with
        :meth:`.FedLoraStrategy.end_round` (evaluation, checkpoint, record). Returns Flower's
        Result (``arrays``: the final global). ``failed``: why the loop stopped before
        ``num_steps`` when it was not the privacy budget ("" otherwise; the ServerApp then
        fails the run after writing its records)."""
        s, cfg = self.strategy, self.strategy.cfg
        self.failed = ""
        s.robustness  # noqa: B018  (validates)
        self.train_config = ConfigRecord() if train_config is None else train_config
        self.num_steps = int(num_steps)
        self.evaluate_fn, self.result = evaluate_fn, Result()
        result, t0 = self.result, time.time()
        s._global = arrays_to_state(initial_arrays)
        if first_step <= 1:
            s.end_round(0, initial_arrays, evaluate_fn, result)
        else:
            self.version = int(first_step) - 1
        _, all_nodes = sample_nodes(grid, s.min_available_nodes, s.min_available_nodes)
        all_nodes = sorted(all_nodes)
        self.num_nodes = len(all_nodes)
        s.learn_tiers(grid, all_nodes, self.stats())
        order = s.sample_by_partition(1, all_nodes, len(all_nodes)) if s.samples_partitions \
            else sorted(all_nodes, key=s.nodes.order_key)
        if first_step > 1:
            order = self.resume(order)
        self.idle.extend(order)
        concurrency = min(int(cfg.concurrency) or len(all_nodes), len(all_nodes))
        if s.privacy.enabled and self.k > len(all_nodes):
            raise ValueError(f"dp with aggregation-mode='async': buffer-size {self.k} > the "
                             f"{len(all_nodes)} nodes (one reply per node per step)")
        log.info("Starting %s, asynchronous (FedBuff): %d steps of %d replies, %d of %d nodes "
                 "training at once, staleness limit %d", type(s).__name__, num_steps, self.k,
                 concurrency, len(all_nodes), self.limit)
        stop = ""
        self._open_step()
        while self.version < self.num_steps:
            if not self.step_open:
                stop = s.privacy.stopped or "the privacy budget is spent"
                break
            self.fill(grid, concurrency)
            if not self.in_flight:
                if not self.backoff or time.time() - self.progress_at > timeout:
                    stop = ("no node is left to train" if not self.backoff else
                            f"no reply accepted for round-timeout {timeout:g} s")
                    self.failed = f"async: stopped after {self.version} of {num_steps} " \
                                  f"steps: {stop}"
                    break
                time.sleep(PULL_INTERVAL)  # every node failed since the last step: ask again
                self.idle.extend(self.backoff)
                self.backoff = []
                continue
            pulled = list(grid.pull_messages(list(self.in_flight)))
            for msg in pulled:
                self.receive(msg)
            self.process(grid, concurrency)
            self.expire(timeout)
            if not pulled:
                time.sleep(PULL_INTERVAL)
        if stop:
            log.warning("async: stopped after %d of %d steps: %s", self.version, num_steps, stop)
            self._record_unfinished(stop)
        if self.in_flight:
            log.info("async: %d tasks still in flight at the end are abandoned",
                     len(self.in_flight))
        result.arrays = state_to_arrays(s._global)
        log.info("Strategy execution finished in %.2fs", time.time() - t0)
        return result

    def _record_unfinished(self, why: str) -> None:
        """The loop stopped early: the step being filled, if anything was sent or received for
        it, is written as a step that changed nothing (``rejected``: why it stopped; the
        replies it had buffered dropped with that reason), so its bytes, failures and drop
        reasons are in the records, and a resume goes on after it."""
        s, v = self.strategy, self.version + 1
        st = s.stats.get(v)
        if not self.step_open:  # DP's budget: that step was refused, nothing was sent for it
            return
        if st is None or not (st.sent or st.received or st.stray or st.failures or st.dropped):
            return
        for b in self.buffer:
            st.drop(b.update.node_id, RuntimeError(f"the async loop stopped before its step: "
                                                   f"{why}"))
        self.buffer, self.num_steps = [], v
        st.rejected = f"stopped: {why}"[:500]
        self.step()

    def state_dict(self) -> dict[str, Any]:
        """The loop's own state for a checkpoint, taken at a step (the buffer is empty then):
        the simulated clock, the dispatch counter, the idle order and the nodes with a task in
        flight (their work is lost when the ServerApp stops)."""
        busy = [t.node for t in sorted(self.in_flight.values(), key=lambda t: t.seq)]
        return {"version": self.version, "clock": self.clock, "seq": self.seq,
                "idle": [int(n) for n in [*self.idle, *self.deferred, *self.backoff]],
                "in_flight": [int(n) for n in busy]}

    def resume(self, order: list[int]) -> list[int]:
        """Continue from a checkpoint (``strategy.async_restored``, set by
        :func:`fedlora.checkpoint.restore`): the clock and counters as they were; the nodes that
        had a task in flight lose their download record (they may or may not have applied that
        download: a full download next) and are asked first, then the idle ones in their order,
        then nodes the checkpoint did not know (new node ids after a simulation restart)."""
        saved = getattr(self.strategy, "async_restored", None) or {}
        if saved.get("version", self.version) != self.version:
            raise ValueError(f"async checkpoint of version {saved.get('version')}, resuming "
                             f"after {self.version}")
        self.clock = float(saved.get("clock", 0.0))
        self.seq = int(saved.get("seq", 0))
        dl = self.strategy.downlink
        for n in saved.get("in_flight", []):
            dl.pending.pop(int(n), None)
            dl.held.pop(int(n), None)
        known = set(order)
        first = [int(n) for n in [*saved.get("in_flight", []), *saved.get("idle", [])]
                 if int(n) in known]
        first = list(dict.fromkeys(first))
        log.info("async: resuming after version %d (%d tasks in flight were lost)",
                 self.version, len(saved.get("in_flight", [])))
        return first + [n for n in order if n not in set(first)]

    def _open_step(self) -> None:
        """The next step's train config: DP charges it (q = 1: no sampling amplification) or
        stops the run at ``dp-target-epsilon`` (None)."""
        v = self.version + 1
        self.stats()
        self.step_open, self.step_dp = self.strategy.privacy.round_config(v, self.k, self.k)


def run_async(strategy: FedLoraStrategy, grid: Grid, initial_arrays: ArrayRecord,
              num_rounds: int, timeout: float, train_config: ConfigRecord | None = None,
              evaluate_fn: "Callable[[int, ArrayRecord], MetricRecord | None] | None" = None,
              first_round: int = 1) -> tuple[Result, str]:
    """The ServerApp's entry: :class:`AsyncLoop` over ``strategy`` for steps
    ``first_round..num_rounds``; returns Flower's Result and why the loop stopped early ("" when
    it did not, or when the privacy budget ended it, as it ends synchronous runs)."""
    loop = AsyncLoop(strategy)
    result = loop.run(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_fn,
                      first_round)
    return result, loop.failed
