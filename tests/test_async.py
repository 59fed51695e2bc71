"""Asynchronous buffered aggregation (FedBuff, ``aggregation-mode=async``,
fedlora/strategies/buffered.py): the step's arithmetic, staleness and hostile replies dropped
with their reasons while the run goes on, delta downloads from the version a node holds, the
deterministic order of ``async-order=simulated``, the config refusals and the straggler knobs.

Most tests drive :class:`AsyncLoop` through :class:`AsyncGrid`, a Grid with Flower's Message
API (``push_messages`` / ``pull_messages``) whose nodes apply their download exactly as the
ClientApp does (``client_app._apply_download``: delta, digests) and answer with a deterministic
update toward a fixed target, encoded with the codec the server asked for: no torch training,
so each test takes well under a second. One test runs the real ServerApp ``run`` with the real
ClientApp through an in-process grid, and one (slow) a real Flower simulation.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Context, Error, Message, MessageType, MetricRecord, RecordDict

from fedlora import client_app, straggler, validate
from fedlora.config import RunConfig
from fedlora.methods import get_method
from fedlora.strategies.base import ADAPTER_KEY, METRICS_KEY, state_to_arrays
from fedlora.strategies.protocol import DownInstruction
from fedlora.strategies.buffered import AsyncLoop, Buffered, StaleReply, Task, staleness_weight
from fedlora.strategies.replies import ClientUpdate
from fedlora.validate import ConfigError
from fedlora.wire import decode_record, encode_record

from conftest import FakeGrid

SHAPES = OrderedDict([("m.lora_A.weight", (2, 3)), ("m.lora_B.weight", (3, 2)),
                      ("fc.bias", (3,))])
TARGET = OrderedDict((k, np.full(s, 1.0, np.float32)) for k, s in SHAPES.items())
INIT = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
TIMING = {"round_s", "wall_s", "eval_s"}


def make(method="fedavg", **kw) -> object:
    kw = {"upload": "delta", "aggregation_mode": "async", "min_available_nodes": 1,
          "min_train_nodes": 1, "fraction_train": 1.0, "download": "delta",
          "codec_down": "fp32", "codec_up": "fp32", **kw}
    return get_method(method).Strategy(RunConfig(method=method, **kw), SHAPES)


class AsyncGrid(FakeGrid):
    """Nodes behind Flower's Message API. A node's reply becomes pullable ``delay[node]`` pulls
    after its train message was pushed (default 0: the next pull); ``shuffle``: each pull
    returns its replies in an order drawn from this generator (arrival order noise);
    ``hostile``: node → a function turning its honest reply content into what it sends."""

    def __init__(self, nodes, delay=None, shuffle=None, hostile=None):
        super().__init__(list(nodes))
        self.delay = delay or {}
        self.shuffle = shuffle
        self.hostile = hostile or {}
        self.ctx = {n: Context(run_id=1, node_id=n, node_config={
            "partition-id": i, "num-partitions": len(nodes)}, state=RecordDict(),
            run_config={}) for i, n in enumerate(nodes)}
        self.pending: list[tuple[int, Message]] = []
        self.pulls = 0
        self.count = 0
        self.trained: list[tuple[int, int]] = []    # (node, server-round) per answered message
        self.pushed: list[int] = []                  # node per train message pushed

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.count += 1
            m.metadata.__dict__["_message_id"] = f"msg-{self.count:06d}"
            self.pending.append((self.pulls + self.delay.get(m.metadata.dst_node_id, 0), m))
            self.pushed.append(m.metadata.dst_node_id)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        want = set(message_ids)
        ready = [m for t, m in self.pending if t < self.pulls and m.metadata.message_id in want]
        self.pending = [(t, m) for t, m in self.pending if m not in ready]
        out = [self.answer(m) for m in ready]
        if self.shuffle is not None:
            self.shuffle.shuffle(out)
        return out

    def answer(self, msg: Message) -> Message:
        """The node's side: apply the download as the ClientApp does, then send an update that
        moves 10% of the way to TARGET, in the codec the server asked for."""
        node = msg.metadata.dst_node_id
        conf = dict(msg.content["config"])
        self.trained.append((node, int(conf["server-round"])))
        decoded = decode_record(msg.content[ADAPTER_KEY], expected=SHAPES)
        received = client_app._apply_download(self.ctx[node], decoded,
                                              DownInstruction.from_config(conf))
        update = OrderedDict((k, (0.1 * (TARGET[k] - v)).astype(np.float32))
                             for k, v in received.items()
                             if not (conf["method"] == "ffa-lora" and ".lora_A." in k))
        content = RecordDict({
            ADAPTER_KEY: encode_record(update, str(conf["codec-up"]), True),
            METRICS_KEY: MetricRecord({"num-examples": 10 + self.partition_of[node],
                                       "train-loss": 1.0})})
        if node in self.hostile:
            content = self.hostile[node](content)
        reply = Message(content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = node
        return reply


def run_loop(strategy, grid, steps=4):
    loop = AsyncLoop(strategy)
    result = loop.run(grid, state_to_arrays(INIT), steps, timeout=60.0)
    return loop, result


def records(strategy, steps):
    return [{k: v for k, v in strategy.round_record(v).items() if k not in TIMING}
            for v in range(1, steps + 1)]


# ------------------------------------------------------------------------------ the step


def tiny_vision(sample_dir, **over) -> dict:
    """The in-process runs' shared run config: the tiny vision model on the sample data, one
    thread, CPU; ``over`` sets each test's own keys."""
    return {"feature-maps": 8, "lora-rank": 4, "local-epochs": 1, "max-examples-per-client": 32,
            "batch-size": 16, "eval-max-examples": 64, "dataset": "npz", "partitioner": "iid",
            "client-threads": 1, "device": "cpu", "data-dir": sample_dir, **over}


def test_step_is_the_staleness_weighted_mean_computed_by_hand(task_identity):
    """One step over a buffer of three updates with staleness 0, 1 and 3: the new global is
    g + Σ n_i/N · Δ_i/√(1+s_i) with N = Σ n_i (FedBuff's scaled, examples-weighted step),
    compared with the same sum written out in float64; the record's histogram counts them."""
    s = make(buffer_size=3, update_norm_bound=1e6)
    loop = AsyncLoop(s)
    rng = np.random.default_rng(0)
    g = OrderedDict((k, rng.standard_normal(sh).astype(np.float32)) for k, sh in SHAPES.items())
    s._global = OrderedDict((k, v.copy()) for k, v in g.items())
    items = [(1, 10, 0), (2, 30, 1), (3, 20, 3)]  # node, num-examples, staleness
    deltas = {n: OrderedDict((k, rng.standard_normal(sh).astype(np.float32))
                             for k, sh in SHAPES.items()) for n, _, _ in items}
    loop.version = 3
    for n, ex, st in items:
        up = ClientUpdate(n, OrderedDict((k, v.copy()) for k, v in deltas[n].items()), ex, {})
        loop.buffer.append(Buffered(up, st, Task(n, 4 - st, 3 - st, f"m{n}", 0.0, 0.0, n)))
    loop.step()
    total = sum(ex for _, ex, _ in items)
    for k in SHAPES:
        want = g[k].astype(np.float64) + sum(
            ex / total * deltas[n][k].astype(np.float64) / math.sqrt(1 + st)
            for n, ex, st in items)
        np.testing.assert_allclose(s._global[k], want, rtol=1e-6, atol=1e-6)
    assert loop.version == 4
    rec = s.round_record(4)
    assert rec["staleness_hist"] == {"0": 1, "1": 1, "3": 1} and rec["clients"] == 3
    assert rec["staleness_mean"] == pytest.approx(4 / 3) and rec["staleness_max"] == 3
    assert staleness_weight("constant", 7) == 1.0


def test_constant_weight_is_fedavg_of_the_buffer(task_identity):
    """``staleness-weight=constant``: the step is the plain examples-weighted mean update (what
    a synchronous round over the same replies applies)."""
    s = make(buffer_size=2, update_norm_bound=1e6, staleness_weight="constant")
    loop = AsyncLoop(s)
    s._global = OrderedDict((k, v.copy()) for k, v in INIT.items())
    a = OrderedDict((k, np.full(sh, 1.0, np.float32)) for k, sh in SHAPES.items())
    b = OrderedDict((k, np.full(sh, 4.0, np.float32)) for k, sh in SHAPES.items())
    loop.buffer = [Buffered(ClientUpdate(1, a, 1, {}), 2, Task(1, 1, 0, "x", 0, 0, 1)),
                   Buffered(ClientUpdate(2, b, 2, {}), 0, Task(2, 1, 0, "y", 0, 0, 2))]
    loop.step()
    for k in SHAPES:
        assert np.all(s._global[k] == np.float32(3.0))


# ------------------------------------------------------------------------------ the loop


def test_stale_reply_is_dropped_with_its_reason_and_the_run_goes_on(task_identity):
    """Node 3 answers 3 pulls late while nodes 1 and 2 answer at once (buffer 1): by the time
    its reply comes the global has moved more than ``staleness-limit`` = 2 versions, so it is
    dropped with a StaleReply naming both versions, counted in ``stale_dropped``, and every
    step still happens. The freed straggler is sent a new task (a delta from the copy it holds:
    its stale answer proved it holds it)."""
    s = make(buffer_size=1, staleness_limit=2)
    grid = AsyncGrid([1, 2, 3], delay={3: 3})
    loop, result = run_loop(s, grid, steps=12)
    assert loop.version == 12
    recs = records(s, 12)
    stale = [d for r in recs for d in r["dropped_reasons"] if d["reason"].startswith("StaleReply")]
    assert stale and all(d["node"] == 3 for d in stale), recs
    assert "staleness" in stale[0]["reason"] and "> staleness-limit 2" in stale[0]["reason"]
    assert sum(r["stale_dropped"] for r in recs) == len(stale)
    assert all(r["clients"] == 1 for r in recs)
    assert grid.pushed.count(3) >= 2  # it got new work after the drop
    assert isinstance(StaleReply("x"), ValueError)


def test_hostile_replies_are_dropped_and_the_run_continues(task_identity):
    """Node 2 sends NaN-free garbage in place of its payload and node 3 a negative
    num-examples: both are dropped with their node id and a reason in every step they answer,
    never aggregated, and the global still converges toward the honest nodes' target."""
    from flwr.app import Array, ArrayRecord

    def garbage(content):
        content[ADAPTER_KEY] = ArrayRecord({"p": Array(dtype="uint8", shape=(7,), stype="fedlora/v2",
                                                 data=b"\x07" * 7)})
        return content

    def negative(content):
        content[METRICS_KEY] = MetricRecord({"num-examples": -5})
        return content

    s = make(buffer_size=1)
    grid = AsyncGrid([1, 2, 3], hostile={2: garbage, 3: negative})
    loop, _ = run_loop(s, grid, steps=6)
    recs = records(s, 6)
    dropped = [d for r in recs for d in r["dropped_reasons"]]
    assert {d["node"] for d in dropped} == {2, 3}
    assert all(r["aggregated"] == [1] for r in (s.stats[v].record(s.tier_of, {}) | {
        "aggregated": s.stats[v].aggregated} for v in range(1, 7)))
    assert loop.version == 6
    # honest steps move every tensor toward TARGET (all ones)
    assert all(float(np.mean(v)) > 0.3 for v in s._global.values())


def test_delta_download_from_the_held_version_is_the_current_global(task_identity):
    """``download=delta``: a node last served at version v is sent codec-down(global − its
    copy); with a lossless codec the copy it holds after applying it is the global it was sent,
    bit for bit, and the server's record of it has the same digest (the node checks it)."""
    s = make(buffer_size=2)
    grid = AsyncGrid([1, 2, 3], delay={3: 2})
    globals_at: dict[int, list] = {}
    loop = AsyncLoop(s)
    orig = loop.dispatch

    def spy(g, node):
        globals_at.setdefault(node, []).append(
            OrderedDict((k, v.copy()) for k, v in s._global.items()))
        orig(g, node)

    loop.dispatch = spy
    loop.run(grid, state_to_arrays(INIT), 5, timeout=60.0)
    sent = sum(len(s.stats[v].sent) for v in range(1, 6))
    full = sum(len(s.stats[v].full_downloads) for v in range(1, 6))
    assert s.stats[1].full_downloads and sent > full  # first contact full, later ones deltas
    for node, ctx in grid.ctx.items():
        held = client_app.arrays_to_state(ctx.state.array_records[client_app.DOWN_KEY])
        assert any(all(np.array_equal(held[k], g[k]) for k in SHAPES)
                   for g in globals_at[node]), node
        meta = ctx.state.config_records[client_app.DOWN_META_KEY]
        records_of = [c.digest for c in [s.downlink.held.get(node)] if c is not None]
        if node in s.downlink.pending:  # its last reply was pulled after the last step
            records_of.append(s.downlink.pending[node][1].digest)
        assert str(meta["digest"]) in records_of


def test_simulated_order_gives_the_same_records_whatever_the_arrival_order(task_identity):
    """``async-order=simulated`` with stragglers: replies arrive in a different order in each
    run (shuffled pulls, different delays), yet both runs process them in simulated completion
    order and give the same records (timings aside) and the same final global, bit for bit.
    ``arrival`` order with the same two arrival patterns gives different staleness."""
    def one(seed, delay, order):
        s = make(buffer_size=2, async_order=order, straggler_fraction=0.34,
                 straggler_slowdown=3.0, staleness_limit=10, seed=7)
        grid = AsyncGrid([1, 2, 3, 4], delay=delay, shuffle=np.random.default_rng(seed))
        loop, res = run_loop(s, grid, steps=6)
        return records(s, 6), s._global

    a, ga = one(0, {}, "simulated")
    for seed, delay in ((1, {1: 3, 4: 1}), (2, {2: 2, 3: 5})):
        b, gb = one(seed, delay, "simulated")
        assert a == b
        for k in SHAPES:
            assert np.array_equal(ga[k], gb[k])
    assert any(r["staleness_hist"] != {"0": 2} for r in a)  # stragglers made some stale
    c, _ = one(0, {}, "arrival")
    d, _ = one(1, {1: 3, 4: 1}, "arrival")
    assert [r["staleness_hist"] for r in c] != [r["staleness_hist"] for r in d]


def test_error_reply_is_a_failure_and_the_node_is_asked_again(task_identity):
    """A node whose ClientApp raised (an error reply) is recorded as a failure with its reason;
    its download record is forgotten (next download full) and it gets new work."""
    from flwr.app import Error

    class Failing(AsyncGrid):
        def answer(self, msg):
            if msg.metadata.dst_node_id == 2 and not getattr(self, "failed", False):
                self.failed = True
                self.trained.append((2, -1))
                err = Message(Error(code=2, reason="boom"), reply_to=msg)
                err.metadata.__dict__["_src_node_id"] = 2
                return err
            return super().answer(msg)

    s = make(buffer_size=1)
    grid = Failing([1, 2])
    loop, _ = run_loop(s, grid, steps=4)
    fails = [f for v in range(1, 5) for f in s.stats[v].failures]
    assert fails == [{"node": 2, "reason": "boom"}]
    assert grid.pushed.count(2) >= 2
    assert loop.version == 4


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("extra, needle", [
    ({"method": "flasc"}, "weighted mean of updates"),
    ({"method": "fedavg", "upload": "weights"}, "upload='delta'"),
    ({"method": "fedavg", "upload": "delta", "secure-aggregation": True,
      "update-norm-bound": 1.0}, "secure-aggregation"),
])
def test_validate_refuses_what_async_does_not_support(extra, needle):
    """One clear line for each unsupported combination, before any Flower process starts."""
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        validate.check({"aggregation-mode": "async", **extra}, light=True)


def test_validate_accepts_async_fedavg_delta():
    validate.check({"aggregation-mode": "async", "method": "fl-lora", "upload": "delta",
                    "buffer-size": 2, "concurrency": 3, "staleness-limit": 0}, light=True)


def test_the_loop_refuses_a_method_it_cannot_step(task_identity):
    with pytest.raises(ValueError, match="aggregation-mode='async' needs"):
        AsyncLoop(make("fedavg", upload="weights"))


# ------------------------------------------------------------------------------ stragglers


def test_stragglers_are_a_seeded_fraction_of_the_partitions():
    """round(f·n) partitions, the same set for the same seed, another set for another seed;
    fraction 0 or slowdown 1: nobody is slowed."""
    a = straggler.stragglers(3, 0.2, 10)
    assert len(a) == 2 and a == straggler.stragglers(3, 0.2, 10)
    assert any(straggler.stragglers(s, 0.2, 10) != a for s in range(4, 10))
    assert len(straggler.stragglers(3, 0.5, 5)) == 2   # round(2.5) = 2 (banker's rounding)
    cfg = RunConfig(straggler_fraction=0.5, straggler_slowdown=10.0, seed=3)
    slow = [p for p in range(4) if straggler.slowdown(cfg, p, 4) == 10.0]
    assert len(slow) == 2
    assert straggler.slowdown(RunConfig(), 0, 4) == 1.0


def test_a_straggler_sleeps_its_measured_training_time_times_factor_minus_one():
    """:class:`TimedTask` times only the task's ``train`` (not model building or data loading,
    which pass through) and the straggler sleeps (S − 1) × that time; S = 1: no sleep."""
    import time as _time

    class Task:
        other = 5

        def train(self, x):
            _time.sleep(0.02)
            return x + 1

    t = straggler.TimedTask(Task())
    assert t.train(1) == 2 and t.other == 5 and t.train_s >= 0.02
    slept = []
    extra = t.slow_down(4.0, slept.append)
    assert slept == [extra] and extra == pytest.approx(3 * t.train_s)
    slept.clear()
    assert t.slow_down(1.0, slept.append) == 0.0 and slept == []


# ------------------------------------------------------------------------------ end to end


def test_server_app_runs_async_with_the_real_client_app(tmp_path, sample_dir, task_identity):
    """The ServerApp ``run`` with ``aggregation-mode=async`` and the real ClientApp (tiny vision
    model, 3 nodes in process, codecs up and down with error feedback, a straggler): every step
    is a record with its version, staleness histogram and measured bytes, and each step's
    checkpoint carries the loop's state."""
    from fedlora.results import read_rounds
    from fedlora.server_app import run

    rc = tiny_vision(sample_dir, **{
        "num-server-rounds": 3, "min-available-nodes": 3, "run-dir": str(tmp_path),
        "run-name": "a", "method": "flocora", "upload": "delta", "aggregation-mode": "async",
        "buffer-size": 2, "download": "delta", "codec-up": "affine:4", "codec-down": "affine:8",
        "error-feedback": True, "straggler-fraction": 0.34, "straggler-slowdown": 2.0,
        "async-order": "simulated"})
    checked = validate.check(rc, light=True)
    grid = InProcessAsyncGrid(checked)
    summary = run(grid, RunConfig.from_run_config(checked))
    recs = read_rounds(tmp_path / "a")
    steps = [r for r in recs if r["round"] >= 1]
    assert [r["version"] for r in steps] == [1, 2, 3]
    assert all(r["clients"] == 2 and sum(r["staleness_hist"].values()) == 2 for r in steps)
    assert all(r["bytes_up"] > 0 for r in steps) and steps[0]["bytes_down"] > 0
    assert all(r["messages_up"] == 2 for r in steps)  # every reply taken, none stale here
    assert sum(r["messages_down"] for r in steps) >= sum(len(r["bytes_down_per_node"])
                                                         for r in steps)
    assert summary["final_accuracy"] is not None
    assert any("straggler-sleep-s" in r["train_metrics"] for r in steps)  # 1 of 3 is slowed
    from fedlora import checkpoint

    assert checkpoint.latest(tmp_path / "a").state()["async"]["version"] == 3


def test_fedavg_comparison_counts_every_message_of_a_node_served_twice_in_a_step():
    """An async step may send one node two train messages (and take two replies): FedAvg's
    equivalent counts messages (``messages_down``/``messages_up``), not nodes; a sync record,
    which has no such counts, is counted by its per-node entries as before."""
    from fedlora.server_app import fedavg_comparison

    step = {"messages_down": 3, "messages_up": 3, "bytes_down_per_node": {"1": 20, "2": 10},
            "bytes_up_per_node": {"1": 8, "2": 4}, "bytes_down": 30, "bytes_up": 12,
            "control_bytes": 0}
    sync = {k: v for k, v in step.items() if not k.startswith("messages")}
    assert fedavg_comparison([step], 1_000_000)["fedavg_equivalent_mb"] == 6.0
    assert fedavg_comparison([sync], 1_000_000)["fedavg_equivalent_mb"] == 4.0


class InProcessAsyncGrid(AsyncGrid):
    """:class:`AsyncGrid` whose nodes are the real ClientApp functions (``train``, ``query``)."""

    def __init__(self, run_config, nodes=(101, 102, 103)):
        super().__init__(list(nodes))
        for i, n in enumerate(nodes):
            self.ctx[n] = Context(run_id=1, node_id=n, node_config={
                "partition-id": i, "num-partitions": len(nodes),
                "data-dir": run_config["data-dir"]}, state=RecordDict(), run_config=run_config)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            reply = client_app.query(m, self.ctx[node])
            reply.metadata.__dict__["_src_node_id"] = node
            out.append(reply)
        return out

    def answer(self, msg):
        node = msg.metadata.dst_node_id
        assert msg.metadata.message_type == MessageType.TRAIN
        reply = client_app.train(msg, self.ctx[node])
        reply.metadata.__dict__["_src_node_id"] = node
        return reply


def test_central_dp_charges_each_step_and_takes_one_reply_per_node(task_identity):
    """``dp=central``: every step is charged to the accountant as one Gaussian release with no
    sampling amplification (q = 1: the record's ε after t steps is that of t plain Gaussian
    mechanisms, from dp_accounting), the buffer never holds two replies of one node (so the
    clipped sum's sensitivity is C), and each step's update is the noisy clipped sum / K."""
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    s = make(buffer_size=2, dp="central", dp_noise_multiplier=1.0, dp_clip=0.05,
             norm_bound_factor=0.0, update_norm_bound=0.0)
    grid = AsyncGrid([1, 2, 3], delay={3: 2})
    loop = AsyncLoop(s)
    seen = []
    orig = loop.step

    def spy():
        seen.append([b.update.node_id for b in loop.buffer])
        orig()

    loop.step = spy
    loop.run(grid, state_to_arrays(INIT), 4, timeout=60.0)
    assert len(seen) == 4 and all(len(set(b)) == len(b) == 2 for b in seen)
    for t in range(1, 5):
        acc = RdpAccountant()
        acc.compose(GaussianDpEvent(1.0), t)
        rec = s.round_record(t)
        assert rec["dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
        assert rec["dp_sample_rate"] == 1.0 and rec["dp_denominator"] == 2


@pytest.mark.slow
def test_flower_simulation_runs_async_steps(tmp_path, sample_dir):
    """A real Flower simulation (``flwr run`` through the launcher, 2 SuperNodes in Ray) with
    ``aggregation-mode=async``: the ServerApp drives the nodes with push/pull, one node is a
    10x straggler, every step is recorded with its version and staleness histogram, the run
    exits 0 and leaves no process behind."""
    from conftest import simulate

    rc = tiny_vision(sample_dir, **{
        "num-server-rounds": 4, "min-available-nodes": 2, "method": "fl-lora",
        "upload": "delta", "download": "delta", "codec-up": "affine:4",
        "aggregation-mode": "async", "buffer-size": 1, "staleness-limit": 8,
        "straggler-fraction": 0.5, "straggler-slowdown": 10.0, "eval-every": 2})
    recs, meta, run_dir, out = simulate(tmp_path, rc)
    steps = [r for r in recs if r["round"] >= 1]
    assert [r["version"] for r in steps] == [1, 2, 3, 4]
    assert all(r["clients"] == 1 and r["bytes_up"] > 0 for r in steps)
    assert meta["config"]["aggregation-mode"] == "async"
    assert "asynchronous (FedBuff)" in out


def test_second_and_unsolicited_replies_are_stray(task_identity):
    """A node that answers each train message twice, and a reply that answers no message this
    server sent: each extra one is dropped apart (``bytes_up_dropped``, a reason) and never
    buffered; the first reply to each message stands and every step happens."""
    class Echo(Recorded):
        def pull_messages(self, message_ids):
            out = list(super().pull_messages(message_ids))
            return out + self.copies(out, of=1, sent_by=1)

    s = make(buffer_size=1)
    grid = Echo([1, 2])
    loop, _ = run_loop(s, grid, steps=4)
    recs = records(s, 4)
    reasons = [d["reason"] for r in recs for d in r["dropped_reasons"]]
    assert reasons and all("second reply" in x for x in reasons)
    assert sum(r["bytes_up_dropped"] for r in recs) > 0
    assert loop.version == 4 and all(r["clients"] == 1 for r in recs)


def test_a_silent_node_times_out_as_a_failure_and_the_others_go_on(task_identity):
    """Node 2 never answers: after ``round-timeout`` its task is a failure with that reason
    (its download record forgotten), it is asked again after the next step, and node 1's
    replies keep stepping the global."""
    import time as _time

    class Slow(AsyncGrid):
        def pull_messages(self, message_ids):
            _time.sleep(0.01)
            return super().pull_messages(message_ids)

    s = make(buffer_size=1)
    grid = Slow([1, 2], delay={2: 10**6})
    loop = AsyncLoop(s)
    loop.run(grid, state_to_arrays(INIT), 30, timeout=0.05)
    fails = [f for v in range(1, 31) for f in s.stats[v].failures]
    assert fails and all(f["node"] == 2 and "round-timeout" in f["reason"] for f in fails)
    assert grid.pushed.count(2) >= 2 and loop.version == 30
    assert all(s.stats[v].aggregated == [1] for v in range(1, 31))


@pytest.mark.slow
def test_deployment_runs_async_over_http_push_and_pull(tmp_path, sample_dir):
    """Real SuperLink and 2 SuperNodes on loopback (``fedlora.launch.Deployment``): the async
    loop's push/pull goes through Flower's HTTP grid (message ids are object ids there), every
    step is recorded with measured bytes, nothing failed or was dropped, and the run exits 0."""
    from fedlora.launch import Deployment, Processes
    from fedlora.results import read_rounds

    rc = {"method": "flocora", "num-server-rounds": 3, "feature-maps": 8, "lora-rank": 4,
          "local-epochs": 1, "max-examples-per-client": 32, "batch-size": 16,
          "dataset": "npz", "partitioner": "iid", "data-dir": sample_dir,
          "run-dir": str(tmp_path / "runs"), "run-name": "async", "upload": "delta",
          "download": "delta", "codec-up": "affine:4", "aggregation-mode": "async",
          "buffer-size": 1}
    with Processes(tmp_path / "logs") as procs:
        dep = Deployment(procs, tmp_path, nodes=2, insecure=True).start()
        res = dep.run(rc, timeout=600, log_file=tmp_path / "flwr-run.log")
    log = (tmp_path / "flwr-run.log").read_text(errors="replace")
    assert res.returncode == 0, log[-4000:]
    recs = read_rounds(tmp_path / "runs" / "async")
    steps = [r for r in recs if r["round"] >= 1]
    assert [r["version"] for r in steps] == [1, 2, 3], log[-3000:]
    assert all(r["clients"] == 1 and r["failures"] == 0 and r["dropped"] == 0 for r in steps)
    assert all(r["bytes_up"] > 0 for r in steps)


@pytest.mark.parametrize("method", ["fedavg", "flocora", "fl-lora", "ffa-lora"])
def test_every_supported_method_steps(task_identity, method):
    """Each method the validator admits runs the loop: every step aggregates one reply and moves
    the tensors the method uploads toward the nodes' target (FFA-LoRA: B only; A stays)."""
    s = make(method, buffer_size=1)
    loop, _ = run_loop(s, AsyncGrid([1, 2]), steps=3)
    assert all(s.stats[v].clients == 1 for v in range(1, 4))
    for k, v in s._global.items():
        frozen = method == "ffa-lora" and ".lora_A." in k
        assert np.all(v == 0) if frozen else np.all(v > 0), k


class CrashingAsyncGrid(InProcessAsyncGrid):
    """:class:`InProcessAsyncGrid` whose SuperLink "dies" (raises) when a train message for
    version ``crash_at`` is pushed; ``contexts``: the nodes' Context states, kept across a
    restart as SuperNodes keep theirs."""

    def __init__(self, run_config, crash_at=None, contexts=None):
        super().__init__(run_config)
        if contexts is not None:
            self.ctx = contexts
        self.crash_at = crash_at

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            if int(m.content["config"]["server-round"]) == self.crash_at:
                from conftest import Crash

                raise Crash(f"SuperLink gone at version {self.crash_at}")
        return super().push_messages(messages)


class FailingAsyncGrid(InProcessAsyncGrid):
    """Every node's ClientApp answers a train message with an error reply."""

    def answer(self, msg):
        reply = Message(Error(code=0, reason="the node broke"), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        return reply


def test_an_async_run_that_stops_early_fails_after_writing_its_records(tmp_path, sample_dir,
                                                                       task_identity):
    """No node ever answers with an update: the loop stops after ``round-timeout`` with 0 of 3
    steps done, and the ServerApp raises (so ``flwr run`` reports the run failed and the
    launcher exits 1) only after its records, summary and adapter are written; the error names
    how many steps were done and why. A run that completes reports no failure (``run_async``'s
    second value is empty)."""
    from fedlora.results import read_rounds
    from fedlora.server_app import run
    from fedlora.strategies.buffered import run_async

    rc = tiny_vision(sample_dir, **{
        "num-server-rounds": 3, "min-available-nodes": 3, "run-dir": str(tmp_path),
        "run-name": "f", "method": "flocora", "upload": "delta", "aggregation-mode": "async",
        "buffer-size": 2, "download": "delta", "round-timeout": 0.5})
    checked = validate.check(rc, light=True)
    with pytest.raises(RuntimeError, match=r"async: stopped after 0 of 3 steps: no reply "
                                           r"accepted for round-timeout 0\.5 s"):
        run(FailingAsyncGrid(checked), RunConfig.from_run_config(checked))
    recs = read_rounds(tmp_path / "f")
    assert [r["round"] for r in recs] == [0, 1] and recs[1]["rejected"].startswith("stopped")
    assert recs[1]["failures"] > 0 and (tmp_path / "f" / "summary.json").exists()
    s = make(buffer_size=1)
    result, failed = run_async(s, AsyncGrid([1, 2]), state_to_arrays(INIT), 2, 60.0)
    assert failed == "" and result.arrays is not None


def test_async_run_resumes_after_a_crash(tmp_path, sample_dir, task_identity):
    """An async run whose ServerApp dies while step 3 is filling, resumed from its checkpoint
    (``resume`` = the run folder): it goes on from version 2 (records 0..4, each once), the nodes
    whose tasks were lost get a full download, every other node a delta from the copy it kept
    (no failure, no drop: the restored download records match the nodes' copies), and the
    checkpoint carries the loop's state (clock, dispatch counter, idle order). Not bit-exact
    with an uninterrupted run: the lost tasks are sent again (docs/async.md)."""
    from conftest import Crash
    from fedlora import checkpoint
    from fedlora.results import read_rounds
    from fedlora.server_app import run

    rc = tiny_vision(sample_dir, **{
        "num-server-rounds": 4, "min-available-nodes": 3, "run-dir": str(tmp_path),
        "run-name": "r", "method": "fedavg", "upload": "delta", "aggregation-mode": "async",
        "buffer-size": 2, "download": "delta", "codec-up": "affine:8",
        "async-order": "simulated"})
    checked = validate.check(rc, light=True)
    grid = CrashingAsyncGrid(checked, crash_at=3)
    with pytest.raises(Crash):
        run(grid, RunConfig.from_run_config(checked))
    saved = checkpoint.latest(tmp_path / "r")
    assert saved.round == 2 and saved.state()["async"]["version"] == 2
    lost = saved.state()["async"]["in_flight"]
    again = validate.check({**rc, "resume": str(tmp_path / "r")}, light=True)
    run(CrashingAsyncGrid(again, contexts=grid.ctx), RunConfig.from_run_config(again))
    recs = read_rounds(tmp_path / "r")
    assert [r["round"] for r in recs] == [0, 1, 2, 3, 4]
    resumed = [r for r in recs if r["round"] >= 3]
    assert all(r["failures"] == 0 and r["dropped"] == 0 and r["clients"] == 2 for r in resumed)
    assert sorted(int(n) for n in resumed[0]["bytes_down_per_node"]) != [] and \
        resumed[0]["full_downloads"] == len(lost)
    # what is promised: per-node download copies checkpointed (every node that answered), and
    # the simulated clock and dispatch counter go on from the checkpoint
    state = saved.state()
    held = {int(n) for n, _, _ in state["strategy"]["downlink"]["held"]}
    assert set(grid.ctx) - set(lost) <= held
    assert state["async"]["clock"] == recs[2]["simulated_time"] > 0
    times = [r["simulated_time"] for r in recs[1:]]
    assert times == sorted(times) and times[2] > state["async"]["clock"]
    assert checkpoint.latest(tmp_path / "r").state()["async"]["seq"] > state["async"]["seq"]


# ------------------------------------------------------------------------------ simulated time


class SyncGrid(AsyncGrid):
    """:class:`AsyncGrid`'s nodes behind the synchronous ``send_and_receive`` (queries answered
    by :class:`FakeGrid`, train messages by :meth:`AsyncGrid.answer`)."""

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        rest = [m for m in messages if m.metadata.message_type != MessageType.TRAIN]
        return [self.answer(m) for m in train] + FakeGrid.send_and_receive(self, rest)


def _sync_run(rounds=6, **kw):
    s = make(aggregation_mode="sync", fraction_train=0.5, min_train_nodes=2,
             straggler_fraction=0.25, straggler_slowdown=10.0, straggler_sleep=False, seed=5,
             **kw)
    grid = SyncGrid([11, 12, 13, 14])
    s.start(grid, state_to_arrays(INIT), rounds, timeout=60.0)
    slow = straggler.stragglers(5, 0.25, 4)
    asked = [{grid.partition_of[n] for n in s.stats[r].asked} for r in range(1, rounds + 1)]
    return s, grid, slow, asked


def test_sync_rounds_keep_the_simulated_clock_of_their_slowest_task(task_identity):
    """Sync with stragglers: each round's ``simulated_time`` is the cumulative sum of the
    round's slowest task cost, computed here by hand from the round's sampled partitions and
    the seeded straggler set (10 if a straggler was sampled, else 1: the async unit); the
    clock is checkpointed (``state_dict``) and restored on resume."""
    s, _, slow, asked = _sync_run()
    assert len(slow) == 1
    by_hand = np.cumsum([10.0 if parts & slow else 1.0 for parts in asked])
    assert {10.0, 1.0} <= {10.0 if p & slow else 1.0 for p in asked}  # both kinds of round
    got = [s.round_record(r)["simulated_time"] for r in range(1, 7)]
    assert got == pytest.approx(list(by_hand))
    resumed = make(aggregation_mode="sync", fraction_train=0.5, min_train_nodes=2,
                   straggler_fraction=0.25, straggler_slowdown=10.0, straggler_sleep=False,
                   seed=5)
    resumed.load_state_dict(s.state_dict())  # a resumed run goes on from the clock
    assert resumed.sim_clock == pytest.approx(by_hand[-1])
    # no stragglers and straggler-sleep on (the default): no clock, records unchanged
    plain = make(aggregation_mode="sync", fraction_train=0.5, min_train_nodes=2)
    plain.start(SyncGrid([11, 12, 13, 14]), state_to_arrays(INIT), 2, timeout=60.0)
    assert "simulated_time" not in plain.round_record(1)
    assert "sim_clock" not in plain.state_dict()


def test_a_simulated_round_timeout_drops_the_slower_tasks(task_identity):
    """``simulated-round-timeout`` 5 < the straggler's cost 10: a round that sampled the
    straggler lasts 5, and its reply is a failure "simulated timeout" (not aggregated, no bytes
    received; its download still counted as sent); the other rounds last 1."""
    s, _, slow, asked = _sync_run(simulated_round_timeout=5.0)
    by_hand = np.cumsum([5.0 if parts & slow else 1.0 for parts in asked])
    assert [s.round_record(r)["simulated_time"] for r in range(1, 7)] == pytest.approx(
        list(by_hand))
    for r, parts in enumerate(asked, start=1):
        st = s.stats[r]
        late = [n for n in st.asked if s.partitions[n] in slow]
        assert [f["node"] for f in st.failures] == late
        assert all(f["reason"].startswith("simulated timeout") for f in st.failures)
        assert st.clients == len(st.asked) - len(late)
        assert all(n in st.sent and n not in st.received for n in late)


def test_async_simulated_time_is_in_the_same_unit(task_identity):
    """``async-order=simulated``, two nodes, one a straggler (cost 3), buffer 1: a normal
    node's task costs 1, so the steps are taken at times 1, 2, 3 and 3 (the straggler's first
    reply and the normal node's third are both due at 3) — the sync loop's unit."""
    s = make(buffer_size=1, async_order="simulated", straggler_fraction=0.5,
             straggler_slowdown=3.0, straggler_sleep=False, staleness_limit=10, seed=7)
    run_loop(s, AsyncGrid([1, 2]), steps=4)
    assert [s.round_record(v)["simulated_time"] for v in range(1, 5)] == [1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("extra, needle", [
    ({"straggler-sleep": False}, "needs async-order='simulated'"),
    ({"straggler-sleep": False, "async-order": "arrival"}, "needs async-order='simulated'"),
    ({"async-order": "simulated", "simulated-round-timeout": 2.0}, "is for aggregation-mode"),
])
def test_validate_refuses_async_without_real_or_simulated_order(extra, needle):
    """Without real time (no sleeps) the arrival order means nothing: refused in one line
    unless ``async-order=simulated``; the simulated round timeout is the sync loop's."""
    rc = {"aggregation-mode": "async", "method": "fedavg", "upload": "delta", **extra}
    with pytest.raises(ConfigError, match=needle):
        validate.check(rc, light=True)
    validate.check({**rc, "async-order": "simulated", "simulated-round-timeout": 0.0},
                   light=True)
    validate.check({"straggler-sleep": False, "simulated-round-timeout": 2.0}, light=True)


class InProcessSyncGrid(InProcessAsyncGrid):
    """The real ClientApp behind ``send_and_receive`` (train messages too)."""

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        rest = [m for m in messages if m.metadata.message_type != MessageType.TRAIN]
        return [self.answer(m) for m in train] + super().send_and_receive(rest)


def test_without_straggler_sleep_the_real_client_app_does_not_sleep(tmp_path, sample_dir,
                                                                     task_identity,
                                                                     monkeypatch):
    """Every node a straggler 1000x slower, ``straggler-sleep=false``: the real ClientApp never
    calls the sleep (patched to fail the reply if it did), its train metrics have no
    ``straggler-sleep-s``, and the ServerApp's sync records carry the simulated clock
    (1000 per round: every task is a straggler's). With sleeps on, the same patch is hit."""
    from fedlora.results import read_rounds
    from fedlora.server_app import run

    slept = []
    monkeypatch.setattr(straggler.TimedTask, "slow_down",
                        lambda self, factor, sleep=None: slept.append(factor) or 0.0)
    rc = tiny_vision(sample_dir, **{
        "num-server-rounds": 2, "max-examples-per-client": 16, "eval-max-examples": 32,
        "min-available-nodes": 3, "min-train-nodes": 3, "fraction-train": 1.0,
        "run-dir": str(tmp_path), "run-name": "a", "method": "fedavg",
        "straggler-fraction": 1.0, "straggler-slowdown": 1000.0, "straggler-sleep": False})
    checked = validate.check(rc, light=True)
    run(InProcessSyncGrid(checked), RunConfig.from_run_config(checked))
    steps = [r for r in read_rounds(tmp_path / "a") if r["round"] >= 1]
    assert slept == []
    assert all(r["failures"] == 0 and r["clients"] == 3 for r in steps)
    assert not any("straggler-sleep-s" in r["train_metrics"] for r in steps)
    assert [r["simulated_time"] for r in steps] == [1000.0, 2000.0]
    checked = validate.check({**rc, "straggler-sleep": True, "run-name": "b",
                              "num-server-rounds": 1}, light=True)
    run(InProcessSyncGrid(checked), RunConfig.from_run_config(checked))
    assert slept == [1000.0] * 3


# ------------------------------------------------------------------------------ an attacker's look


class Recorded(AsyncGrid):
    """:class:`AsyncGrid` that keeps every train message it was pushed (``asked``: id →
    message), so a test can forge replies to them, and fails a run that spins: more than
    ``max_pushes`` train messages raise (a loop that never ends would otherwise hang the test)."""

    def __init__(self, nodes, max_pushes=10_000, **kw):
        super().__init__(nodes, **kw)
        self.asked: dict[str, Message] = {}
        self.max_pushes = max_pushes

    def push_messages(self, messages):
        messages = list(messages)
        if len(self.pushed) + len(messages) > self.max_pushes:
            raise AssertionError(f"the loop spins: over {self.max_pushes} train messages")
        ids = super().push_messages(messages)
        self.asked.update({m.metadata.message_id: m for m in messages})
        return ids

    def copies(self, replies, of, sent_by):
        """A copy of each of node ``of``'s ``replies``, answering the same train message, as
        if node ``sent_by`` sent it (its source, as the SuperLink would set it)."""
        out = []
        for r in replies:
            if r.metadata.src_node_id == of:
                c = Message(r.content, reply_to=self.asked[r.metadata.reply_to_message_id])
                c.metadata.__dict__["_src_node_id"] = sent_by
                out.append(c)
        return out


def test_a_forged_reply_to_another_nodes_task_does_not_displace_its_real_reply(task_identity):
    """Node 2 copies node 1's reply and sends it as its own answer to node 1's train message,
    in the same pull and ahead of it. The forgery is stray (it answers no task in flight to
    node 2) and node 1's real reply is buffered and aggregated. Kept first, the forgery used to
    make node 1's own reply 'a second reply' and leave node 1's task in flight until
    round-timeout, so one message silenced a node for an hour."""
    class Forger(Recorded):
        def pull_messages(self, message_ids):
            out = list(super().pull_messages(message_ids))
            return self.copies(out, of=1, sent_by=2) + out

    s = make(buffer_size=2)
    grid = Forger([1, 2])
    loop, _ = run_loop(s, grid, steps=4)
    assert loop.version == 4
    for v in range(1, 5):
        st = s.stats[v]
        assert sorted(st.aggregated) == [1, 2] and st.failures == [], v
        assert all(d["node"] == 2 and "no train message in flight to this node" in d["reason"]
                   for d in st.stray), st.stray
    assert sum(len(s.stats[v].stray) for v in range(1, 5)) >= 3
    assert grid.pushed.count(1) >= 4  # node 1 kept being served


def test_a_node_answering_garbage_at_once_waits_for_the_next_step(task_identity):
    """Node 1 answers every task at once with garbage; nodes 2..4 answer honestly, 3 pulls
    after their task (concurrency 3 of 4 nodes, buffer 2). Each garbage reply is dropped with
    its reason and node 1 is asked again only after the next step (as a failed node), not
    served in a tight loop. The honest nodes fill its slot: at every step, concurrency − 1 tasks
    are in flight (only the node whose reply filled the buffer waits for the step)."""
    from flwr.app import Array, ArrayRecord

    def garbage(content):
        content[ADAPTER_KEY] = ArrayRecord({"payload": Array(
            dtype="uint8", shape=(9,), stype="fedlora/v2", data=b"\x07" * 9)})
        return content

    s = make(buffer_size=2, concurrency=3)
    grid = Recorded([1, 2, 3, 4], delay={2: 3, 3: 3, 4: 3}, hostile={1: garbage})
    loop, _ = run_loop(s, grid, steps=6)
    assert loop.version == 6
    recs = records(s, 6)
    assert all(r["in_flight"] == 2 for r in recs), [r["in_flight"] for r in recs]
    assert all(1 not in s.stats[v].aggregated and len(s.stats[v].aggregated) == 2
               for v in range(1, 7))
    drops = [d for r in recs for d in r["dropped_reasons"]]
    assert drops and all(d["node"] == 1 for d in drops)
    assert grid.pushed.count(1) <= 6 + 1, grid.pushed  # once at the start, then once a step


def test_a_network_of_hostile_nodes_ends_the_run_after_round_timeout(task_identity):
    """Every node answers at once with a payload that fails decoding: no step can be taken. The
    loop asks the nodes again (a few times, not thousands) and stops after ``round-timeout``
    with no accepted reply instead of spinning forever (it used to re-dispatch each dropped
    node at once, so ``in_flight`` was never empty and the stop condition was never reached).
    The step it was filling is recorded, every drop with its reason, and the global is
    unchanged."""
    import time as _time

    from flwr.app import Array, ArrayRecord

    def garbage(content):
        content[ADAPTER_KEY] = ArrayRecord({"payload": Array(
            dtype="uint8", shape=(9,), stype="fedlora/v2", data=b"\x07" * 9)})
        return content

    s = make(buffer_size=1)
    grid = Recorded([1, 2], hostile={1: garbage, 2: garbage}, max_pushes=400)
    t0 = _time.time()
    loop = AsyncLoop(s)
    loop.run(grid, state_to_arrays(INIT), 4, timeout=0.3)
    assert _time.time() - t0 < 10
    # the unfinished step is written as one that changed nothing, so its bytes and drop
    # reasons are in the records (they used to be lost with the loop)
    rec = s.round_record(1)
    assert loop.version == 1 and rec["clients"] == 0 and rec["version"] == 1
    assert rec["rejected"].startswith("stopped: no reply accepted for round-timeout")
    assert rec["dropped_reasons"] and all(d["node"] in (1, 2) and d["reason"]
                                          for d in rec["dropped_reasons"])
    assert len(rec["dropped_reasons"]) == len(grid.pushed)  # every task answered and dropped
    assert rec["bytes_down"] > 0 and rec["bytes_up"] + rec["bytes_up_dropped"] > 0
    assert all(np.array_equal(s._global[k], INIT[k]) for k in SHAPES)


def test_what_a_reply_claims_sets_neither_its_version_nor_its_weight(task_identity):
    """A reply's version is the server's record of the task it answers, never what the node
    says: node 2 claims (config and metrics) to have trained on version 10⁶, and the run is
    identical, staleness and final global bit for bit, to one where it does not. Node 3 claims
    10¹² examples: its weight is capped at max-weight-ratio × the buffer's lower median
    (recorded in ``capped_weights``). Node 4 claims 0 examples and node 5 sends an 8 MB junk
    payload: both are dropped with their reasons every time, and every step still aggregates
    the three others."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    def future(content):
        content["config"] = ConfigRecord({"server-round": 10**6, "version": 10**6})
        m = dict(content[METRICS_KEY])
        content[METRICS_KEY] = MetricRecord({**m, "server-round": 10**6})
        return content

    def billions(content):
        content[METRICS_KEY] = MetricRecord({"num-examples": 10**12, "train-loss": 1.0})
        return content

    def nothing(content):
        content[METRICS_KEY] = MetricRecord({"num-examples": 0, "train-loss": 1.0})
        return content

    def huge(content):
        content[ADAPTER_KEY] = ArrayRecord({"payload": Array(
            dtype="uint8", shape=(8 << 20,), stype="fedlora/v2",
            data=np.random.default_rng(0).bytes(8 << 20))})
        return content

    def one(claim):
        hostile = {3: billions, 4: nothing, 5: huge, **({2: future} if claim else {})}
        s = make(buffer_size=3)
        loop, _ = run_loop(s, Recorded([1, 2, 3, 4, 5], hostile=hostile), steps=4)
        assert loop.version == 4
        return s, [s.round_record(v)["staleness_hist"] for v in range(1, 5)]

    s, hists = one(True)
    honest, honest_hists = one(False)
    assert hists == honest_hists
    for k in SHAPES:
        assert np.array_equal(s._global[k], honest._global[k])
    for v in range(1, 5):
        st = s.stats[v]
        assert sorted(st.aggregated) == [1, 2, 3], v
        # 3 × the lower median of (10, 11, 10¹²)
        assert st.capped == [{"node": 3, "reported": 10**12, "used": 3 * 11}]
    drops = [d for v in range(1, 5) for d in s.stats[v].dropped]
    assert {d["node"] for d in drops} == {4, 5}
    assert all("num-examples must be a positive number" in d["reason"] for d in drops
               if d["node"] == 4)
    assert all(d["reason"].startswith("CodecError") for d in drops if d["node"] == 5)
    assert [d["node"] for d in drops].count(4) >= 2 and [d["node"] for d in drops].count(5) >= 2


def test_with_concurrency_0_every_node_trains_and_staleness_grows_as_documented(task_identity):
    """20 nodes, ``concurrency`` 0 (every node), buffer 5, simulated order, nobody slowed (the
    ``text-async`` shape): all 20 get a task at the start, so the first step sends a download
    to every node; the 20 first replies are all due at time 1 and fill four buffers, whose
    replies are 0, 1, 2 and 3 versions stale; at every step 19 tasks are in flight (the node
    whose reply filled the buffer is sent its next task after the step)."""
    s = make(buffer_size=5, concurrency=0, async_order="simulated", staleness_limit=10)
    nodes = list(range(101, 121))
    loop, _ = run_loop(s, AsyncGrid(nodes), steps=4)
    recs = records(s, 4)
    assert set(int(n) for n in recs[0]["bytes_down_per_node"]) == set(nodes)
    assert recs[0]["full_downloads"] == 20
    assert [r["staleness_hist"] for r in recs] == [{"0": 5}, {"1": 5}, {"2": 5}, {"3": 5}]
    assert [r["simulated_time"] for r in recs] == [1.0] * 4
    assert all(r["in_flight"] == 19 and r["clients"] == 5 for r in recs)


def test_same_seed_same_records_with_the_real_client_app(tmp_path, sample_dir, task_identity):
    """Issue 37 item 3: the real ServerApp and ClientApp in process, stragglers simulated
    (``straggler-sleep=false``), sync rounds (2 of 3 nodes sampled, replies reversed in one run)
    and async (``async-order=simulated``), each run twice with the same config and seed but
    replies arriving differently (async: one node 2 pulls late, pulls shuffled): the records
    are identical field for field, wall times aside (and ``checkpoint_bytes``: the file holds
    the records, wall times included), and so is the final global model, bit for bit."""
    import torch

    from fedlora.results import read_rounds
    from fedlora.server_app import run

    def one(name, delay, shuffle, mode="async"):
        rc = tiny_vision(sample_dir, **{
            "num-server-rounds": 3, "min-available-nodes": 3, "run-dir": str(tmp_path),
            "run-name": name, "method": "fl-lora", "upload": "delta", "download": "delta",
            "aggregation-mode": mode, "buffer-size": 2, "codec-up": "affine:8",
            "straggler-fraction": 0.34, "straggler-slowdown": 3.0, "straggler-sleep": False,
            "staleness-limit": 10, "eval-every": 3, "seed": 4, "fraction-train": 0.67,
            "min-train-nodes": 2, **({"async-order": "simulated"} if mode == "async" else {})})
        checked = validate.check(rc, light=True)
        grid = (InProcessAsyncGrid if mode == "async" else ReversedSyncGrid)(checked)
        grid.delay, grid.shuffle = delay, shuffle
        run(grid, RunConfig.from_run_config(checked))
        # checkpoint_bytes: the file embeds the records, wall times and all
        return [{k: v for k, v in r.items() if k not in TIMING | {"checkpoint_bytes"}}
                for r in read_rounds(tmp_path / name)]

    class ReversedSyncGrid(InProcessSyncGrid):
        """Sync rounds whose replies come back in reverse order every other call."""

        def send_and_receive(self, messages, timeout=None):
            out = super().send_and_receive(messages, timeout)
            self.calls = getattr(self, "calls", 0) + 1
            return out[::-1] if self.shuffle is not None and self.calls % 2 else out

    sa, sb = one("sa", {}, None, "sync"), one("sb", {}, np.random.default_rng(3), "sync")
    assert len(sa) == 4 and sa == sb and sa[-1]["simulated_time"] > 0
    a = one("a", {}, None)
    b = one("b", {102: 2}, np.random.default_rng(3))
    assert len(a) == 4 and a == b
    assert any(r.get("staleness_max", 0) > 0 for r in a)  # the straggler made some stale
    final = [torch.load(tmp_path / n / "checkpoint.pt", weights_only=False)["travelling"]
             for n in ("a", "b")]
    assert final[0].keys() == final[1].keys()
    assert all(np.array_equal(final[0][k], final[1][k]) for k in final[0])


def test_with_dp_a_node_answers_at_most_once_between_two_steps(task_identity):
    """``dp=local``: each step is charged as one release per node (q = 1), so no node may send
    two updates between two steps. Node 3's first task is slow and its reply comes back stale
    (``staleness-limit`` 0): it must wait for the step like a node whose reply was buffered.
    Sent new work at once, it used to answer again before that step, a second release in one
    step's charge. Checked on every processed reply: (node, version it arrived at) never
    repeats, and every step is still taken."""
    class Schedule(dict):
        """node 3: its first reply 4 pulls late, the later ones at once; node 4: 2 pulls."""

        def get(self, node, default=0):
            if node == 3:
                self[3] = dict.get(self, 3, 0) + 1
                return 4 if self[3] == 1 else 0
            return 2 if node == 4 else default

    s = make(buffer_size=3, dp="local", dp_noise_multiplier=1.0, dp_clip=0.5,
             staleness_limit=0, norm_bound_factor=0.0, update_norm_bound=0.0)
    grid = AsyncGrid([1, 2, 3, 4])
    grid.delay = Schedule()  # (an empty dict is falsy: not through the constructor)
    loop = AsyncLoop(s)
    seen = []
    orig = loop.on_reply

    def spy(msg):
        seen.append((msg.metadata.src_node_id, loop.version))
        orig(msg)

    loop.on_reply = spy
    loop.run(grid, state_to_arrays(INIT), 5, timeout=60.0)
    assert loop.version == 5
    stale = [d for v in range(1, 6) for d in s.stats[v].dropped if "StaleReply" in d["reason"]]
    assert any(d["node"] == 3 for d in stale)
    assert len(seen) == len(set(seen)), seen


def test_keyed_and_sparse_codecs_both_ways_with_the_real_client_app(tmp_path, sample_dir,
                                                                    task_identity):
    """Item 2's "all codecs": the real ClientApp with a keyed upload codec (``eden:0.5``: the
    node needs the run's codec key, named in its train message) and error feedback, and a
    sparse delta download (``topk:0.5|affine:8``, full downloads in ``affine:8``): every reply
    decodes (no drop, no failure) and every step aggregates its buffer, with nodes that are
    served again getting delta downloads."""
    from fedlora.results import read_rounds
    from fedlora.server_app import run

    rc = tiny_vision(sample_dir, **{
        "num-server-rounds": 2, "min-available-nodes": 3, "run-dir": str(tmp_path),
        "max-examples-per-client": 16, "run-name": "k", "method": "fl-lora", "upload": "delta",
        "download": "delta",
        "aggregation-mode": "async", "buffer-size": 2, "codec-up": "eden:0.5",
        "error-feedback": True, "codec-down": "topk:0.5|affine:8",
        "codec-down-full": "affine:8", "eval-every": 2})
    checked = validate.check(rc, light=True)
    run(InProcessAsyncGrid(checked), RunConfig.from_run_config(checked))
    steps = [r for r in read_rounds(tmp_path / "k") if r["round"] >= 1]
    assert [r["version"] for r in steps] == [1, 2]
    assert all(r["clients"] == 2 and r["failures"] == 0 and r["dropped"] == 0 for r in steps)
    assert sum(r["messages_down"] for r in steps) > sum(r["full_downloads"] for r in steps)


@pytest.mark.parametrize("mode", ["local", "central"])
def test_once_the_budget_is_spent_no_task_goes_out_without_dp(task_identity, mode):
    """``dp-target-epsilon`` calibrated for 2 steps of a 6-step run: the third step would
    overspend, so the loop stops after 2. Every train message it pushed carries the step's DP
    instruction. It used to send the nodes freed by step 2 new tasks with none (with
    ``dp=local``, unnoised updates left on the SuperLink) and to keep filling a step the
    accountant had refused. No record is written past step 2."""
    from fedlora.strategies.protocol import DPInstruction

    class Watched(AsyncGrid):
        def push_messages(self, messages):
            messages = list(messages)
            self.dp = getattr(self, "dp", []) + [
                DPInstruction.from_config(dict(m.content["config"])) for m in messages]
            return super().push_messages(messages)

    s = make(buffer_size=2, dp=mode, dp_target_epsilon=8.0, dp_clip=0.5, num_server_rounds=6,
             norm_bound_factor=0.0, update_norm_bound=0.0)
    s.privacy.rounds_planned = 2  # calibrated for 2 steps: the third would overspend
    grid = Watched([1, 2, 3])
    loop, _ = run_loop(s, grid, steps=6)
    assert loop.version == 2 and s.privacy.stopped
    assert grid.dp and all(d is not None and d.mode == mode for d in grid.dp)
    assert not s.stats.get(3) or not s.stats[3].sent


def test_a_node_whose_message_could_not_be_pushed_is_asked_again(task_identity):
    """The grid refuses node 2's first train message (no message id): a failure with that
    reason, and node 2 is asked again after the next step (it used to leave the rotation for
    the rest of the run) and then takes part in the steps."""
    refuse = {2}

    class Refusing(AsyncGrid):
        def push_messages(self, messages):
            messages = list(messages)
            dst = {m.metadata.dst_node_id for m in messages}
            if dst & refuse:
                refuse.difference_update(dst)
                return [""] * len(messages)
            return super().push_messages(messages)

    s = make(buffer_size=1)
    loop, _ = run_loop(s, Refusing([1, 2]), steps=6)
    assert [f for v in range(1, 7) for f in s.stats[v].failures] == [
        {"node": 2, "reason": "the train message could not be pushed"}]
    assert any(2 in s.stats[v].aggregated for v in range(2, 7)) and loop.version == 6
