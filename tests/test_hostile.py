"""Hostile and faulty nodes (issue 13): one test per attack. Each drives the server half of a
method with Flower messages as a node would send them and checks that the global model (and
FLASC's optimizer state) is unchanged or moved within the bound, that the bad input is recorded
with the node id and a reason, and that nothing raises."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedlora.adapters import rank_mask, truncate_ranks
from fedlora.config import RunConfig
from fedlora.methods import get_method
from fedlora.strategies import guard
from fedlora.strategies.base import ADAPTER_KEY, METRICS_KEY, arrays_to_state, state_to_arrays
from fedlora.wire import decode_record, encode_record

from conftest import FakeGrid

R, D = 4, 16
SHAPES = OrderedDict()
for _m in ("m0", "m1"):
    SHAPES[f"{_m}.lora_A.weight"] = (R, D)
    SHAPES[f"{_m}.lora_B.weight"] = (D, R)
SHAPES["fc.bias"] = (D,)

AVERAGING = ["flocora", "fedavg", "fl-lora", "ffa-lora"]
ALL = AVERAGING + ["flexlora", "hetlora", "lora-a2", "flasc"]
HUGE = np.float32(1e30)


def toy(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return OrderedDict((k, (scale * rng.standard_normal(s)).astype(np.float32))
                       for k, s in SHAPES.items())


def make(method, **kw):
    kw = {"min_train_nodes": 1, "min_available_nodes": 1, "fraction_train": 1.0,
          "lora_rank": R, **kw}
    return get_method(method).Strategy(RunConfig(method=method, **kw), SHAPES)


def configure(s, rnd, state, nodes, grid=None):
    return list(s.configure_train(rnd, state_to_arrays(state), ConfigRecord(),
                                  grid or FakeGrid(list(nodes))))


def honest(s, msg, rnd, seed, scale=0.01):
    """What a well-behaved node uploads: a small update of what it received (FLASC, LoRA-A2:
    the update itself)."""
    received = decode_record(msg.content[ADAPTER_KEY], expected=SHAPES)
    rng = np.random.default_rng(seed)
    out = OrderedDict()
    for k, shape in s.upload_shapes(rnd).items():
        d = (scale * rng.standard_normal(shape)).astype(np.float32)
        out[k] = d if s.replies_are_deltas else received[k] + d
    return within_budget(s, node_of(msg), out)


def within_budget(s, node, tensors):
    """An honest node's rank slices: FlexLoRA / HetLoRA none at or beyond its rank, LoRA-A2 its
    budget's worth (the first ``budget`` slices of each module)."""
    if hasattr(s, "client_rank"):
        return truncate_ranks(tensors, s.client_rank(node))
    if s.name == "lora-a2":
        keep = range(s.budget(node))
        return OrderedDict((k, np.where(rank_mask(k, v.shape, keep), v, np.float32(0))
                            if ".lora_" in k else v)
                           for k, v in tensors.items())
    return tensors


def hostile_values(s, rnd, value=HUGE, node=None):
    """``value`` everywhere; with ``node``, only in the rank slices that node may send (so
    the norm bound, not the rank budget, is what stops it)."""
    out = OrderedDict((k, np.full(shape, value, np.float32))
                      for k, shape in s.upload_shapes(rnd).items())
    return out if node is None else within_budget(s, node, out)


def reply(msg, tensors=None, n=10, spec=None, record=None, **metrics):
    rec = record if record is not None else encode_record(
        tensors, spec or msg.content["config"]["codec-up"])
    return Message(RecordDict({ADAPTER_KEY: rec, METRICS_KEY: MetricRecord(
        {"num-examples": n, "train-loss": 1.0, **metrics})}), reply_to=msg)


def dist(a, b, keys=None):
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2))
                         for k in (keys or a)))


def node_of(msg):
    return msg.metadata.dst_node_id


# ------------------------------------------------------------------------- 1. weight takeover
@pytest.mark.parametrize("method", ALL)
def test_num_examples_1e15_is_capped_for_every_method(task_identity, method):
    """An honest-looking upload that claims 1e15 examples counts as at most 3 × the round's
    median count (max-weight-ratio), never as the whole round."""
    s = make(method)
    g = toy(0)
    msgs = configure(s, 1, g, (1, 2, 3, 4))
    ns = [10, 20, 30, 1e15]
    ups = [honest(s, m, 1, 10 + i) for i, m in enumerate(msgs)]
    arrays, metrics = s.aggregate_train(1, [reply(m, u, n) for m, u, n in zip(msgs, ups, ns)])
    rec = s.round_record(1)
    assert rec["dropped"] == 0 and rec["clients"] == 4
    assert rec["capped_weights"] == [{"node": 4, "reported": 10**15, "used": 60}]
    assert metrics["num-examples"] == 10 + 20 + 30 + 60
    new = arrays_to_state(arrays)
    if method in ("flocora", "fl-lora", "fedavg"):
        for k in SHAPES:
            want = sum(w * u[k].astype(np.float64) for w, u in zip([10, 20, 30, 60], ups)) / 120
            np.testing.assert_allclose(new[k], want, rtol=1e-5, atol=1e-6)
    if method == "lora-a2":
        for k in ups[0]:
            want = g[k] + sum(w * u[k].astype(np.float64)
                              for w, u in zip([10, 20, 30, 60], ups)) / 120
            np.testing.assert_allclose(new[k], want, rtol=1e-5, atol=1e-6)


def test_weight_caps_server_known_maximum_and_equal_weights(task_identity):
    """``max-examples-per-client`` caps a count outright; ``equal-weights`` ignores counts; with
    two replies the (lower) median is the smaller count, so one node cannot raise it."""
    g = toy(0)
    for kw, weights in [({"max_examples_per_client": 25, "max_weight_ratio": 0.0}, [10, 25]),
                        ({"equal_weights": True}, [1, 1]),
                        ({"max_examples_per_client": 0}, [10, 30])]:
        s = make("flocora", **kw)
        msgs = configure(s, 1, g, (1, 2))
        ups = [honest(s, m, 1, i) for i, m in enumerate(msgs)]
        arrays, _ = s.aggregate_train(1, [reply(msgs[0], ups[0], 10),
                                          reply(msgs[1], ups[1], 10**9)])
        new = arrays_to_state(arrays)
        for k in SHAPES:
            want = (weights[0] * ups[0][k].astype(np.float64) + weights[1] * ups[1][k]) / sum(weights)
            np.testing.assert_allclose(new[k], want, rtol=1e-5, atol=1e-6)
    assert guard.cap_weights([10, 10**9], 3.0, 0) == [10, 30]
    assert guard.cap_weights([5, 7, 9, 10**6], 3.0, 1000) == [5, 7, 9, 21]


# ------------------------------------------------------------------------- 2. huge values
@pytest.mark.parametrize("method", ALL)
def test_values_1e30_are_clipped_for_every_method(task_identity, method):
    """Three honest replies and one of 1e30 everywhere: the attacker's update is scaled to
    5 × the median update norm and the global moves at most that far (weight-averaging methods
    and LoRA-A2: ‖new − old‖ ≤ bound; FLASC: its AdamW step stays finite and lr-sized)."""
    s = make(method)
    g = toy(0)
    msgs = configure(s, 1, g, (1, 2, 3, 4))
    replies = [reply(m, honest(s, m, 1, i)) for i, m in enumerate(msgs[:3])]
    replies.append(reply(msgs[3], hostile_values(s, 1, node=4)))
    arrays, _ = s.aggregate_train(1, replies)
    rec = s.round_record(1)
    assert rec["dropped"] == 0 and rec["rejected"] == ""
    assert [c["node"] for c in rec["clipped"]] == [4]
    bound = rec["norm_bound"]
    assert bound is not None and bound < 1.0 and rec["clipped"][0]["norm"] > 1e30
    new = arrays_to_state(arrays)
    assert all(np.all(np.isfinite(v)) for v in new.values())
    if method in AVERAGING or method == "lora-a2":
        assert dist(new, g) <= bound * (1 + 1e-5)
    elif method == "flasc":
        assert max(float(np.abs(new[k] - g[k]).max()) for k in g) < 2 * s.cfg.server_lr
        assert not s._non_finite()
    else:  # flexlora / hetlora rebuild the factors: bounded, finite, nowhere near 1e30
        assert max(float(np.abs(v).max()) for v in new.values()) < 10


@pytest.mark.parametrize("method", ["flocora", "lora-a2"])
def test_reject_action_and_absolute_bound(task_identity, method):
    """``norm-bound-action=reject`` drops the outlier (node id and norm in the record); an
    absolute ``update-norm-bound`` applies even to a round of two replies."""
    s = make(method, norm_bound_action="reject")
    g = toy(0)
    msgs = configure(s, 1, g, (1, 2, 3, 4))
    ups = [honest(s, m, 1, i) for i, m in enumerate(msgs[:3])]
    replies = [reply(m, u) for m, u in zip(msgs, ups)] + [reply(msgs[3],
                                                                hostile_values(s, 1, node=4))]
    arrays, _ = s.aggregate_train(1, replies)
    rec = s.round_record(1)
    assert rec["clients"] == 3 and rec["dropped"] == 1
    assert rec["dropped_reasons"][0]["node"] == 4
    assert "over the bound" in rec["dropped_reasons"][0]["reason"]
    honest_only = make(method)
    m2 = configure(honest_only, 1, g, (1, 2, 3))
    want = arrays_to_state(honest_only.aggregate_train(1, [reply(m, u) for m, u in zip(m2, ups)])[0])
    for k in SHAPES:
        np.testing.assert_allclose(arrays_to_state(arrays)[k], want[k], rtol=1e-6, atol=1e-7)

    s = make(method, update_norm_bound=0.5)
    msgs = configure(s, 1, g, (1, 2))
    arrays, _ = s.aggregate_train(1, [reply(msgs[0], honest(s, msgs[0], 1, 0)),
                                      reply(msgs[1], hostile_values(s, 1, node=2))])
    rec = s.round_record(1)
    assert rec["norm_bound"] == 0.5 and [c["node"] for c in rec["clipped"]] == [2]
    assert dist(arrays_to_state(arrays), g) <= 0.5 * (1 + 1e-5)


def test_no_automatic_bound_below_three_replies():
    assert guard.norm_bound([1.0, 1e30], 0.0, 5.0) is None
    assert guard.norm_bound([1.0, 2.0, 1e30], 0.0, 5.0) == 10.0
    assert guard.norm_bound([1.0, 2.0, 3.0, 1e30], 0.0, 5.0) == 10.0   # lower median
    assert guard.norm_bound([1.0], 0.7, 5.0) == 0.7


# ------------------------------------------------------------------------- 3. FLASC optimizer
def _flasc_snapshot(s):
    params = {k: p.detach().clone() for k, p in s._params.items()}
    st = s._opt.state_dict()
    state = {i: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in d.items()}
             for i, d in st["state"].items()}
    return params, state, [dict(g) for g in st["param_groups"]]


def _assert_same(a, b):
    pa, sa, ga = a
    pb, sb, gb = b
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for n in sa[i]:
            x, y = sa[i][n], sb[i][n]
            assert torch.equal(x, y) if torch.is_tensor(x) else x == y, (i, n)
    assert ga == gb


def _flasc_round(s, rnd, state, nodes, attack=None):
    msgs = configure(s, rnd, state, nodes)
    replies = [reply(m, honest(s, m, rnd, 100 * rnd + i)) for i, m in enumerate(msgs)]
    if attack is not None:
        replies[-1] = reply(msgs[-1], attack)
    arrays, _ = s.aggregate_train(rnd, replies)
    return None if arrays is None else arrays_to_state(arrays)


def test_flasc_not_frozen_by_1e30(task_identity):
    """Two nodes, the trusted bound off (``norm-bound-history=0``: no automatic bound), one sends
    1e30: AdamW's second moment would overflow to inf and freeze every later step. The step is
    rejected, parameters and optimizer state are exactly as before, and the next honest round
    is the step an unattacked server takes."""
    s, twin = make("flasc", norm_bound_history=0), make("flasc", norm_bound_history=0)
    g = toy(0)
    s1 = _flasc_round(s, 1, g, (1, 2))
    assert _flasc_round(twin, 1, g, (1, 2)) is not None
    before = _flasc_snapshot(s)
    assert _flasc_round(s, 2, s1, (1, 2), attack=hostile_values(s, 2)) is None
    assert "non-finite" in s.round_record(2)["rejected"]
    _assert_same(before, _flasc_snapshot(s))
    a = _flasc_round(s, 3, s1, (1, 2))
    b = _flasc_round(twin, 3, s1, (1, 2))
    for k in g:
        np.testing.assert_array_equal(a[k], b[k])
    assert max(float(np.abs(a[k] - s1[k]).max()) for k in g) > 0.5 * s.cfg.server_lr  # not frozen


@pytest.mark.parametrize("opt", ["avg", "sgd"])
def test_flasc_avg_sgd_rejected_round_rolls_back(task_identity, opt):
    """A step that overflows the global (server-opt avg/sgd) is rejected and rolled back; later
    honest rounds are accepted again (before, the optimizer's own inf copy rejected them all).
    The trusted bound is off here (it would clip the push): this is the rollback alone."""
    s = make("flasc", server_opt=opt, server_lr=1.0, norm_bound_history=0)
    g = toy(0)
    g["fc.bias"][0] = 3e38           # the server's own state, near float32's max
    state = _flasc_round(s, 1, g, (1, 2))
    before = _flasc_snapshot(s)
    push = OrderedDict((k, np.zeros(v, np.float32)) for k, v in SHAPES.items())
    push["fc.bias"][0] = 3e38
    assert _flasc_round(s, 2, state, (1, 2), attack=push) is None
    assert "non-finite" in s.round_record(2)["rejected"]
    _assert_same(before, _flasc_snapshot(s))
    after = _flasc_round(s, 3, state, (1, 2))
    assert after is not None and all(np.all(np.isfinite(v)) for v in after.values())


@pytest.mark.parametrize("opt", ["adamw", "avg"])
def test_flasc_base_keep_previous_path_rolls_back(task_identity, monkeypatch, opt):
    """The base class's own guard (a non-finite aggregate keeps the previous global) calls the
    method's rollback: FLASC's parameters and AdamW state equal those before the round (avg,
    which keeps no checkpoint, takes them back from the global the round was configured with)."""
    s = make("flasc", server_opt=opt)
    g = toy(0)
    s1 = _flasc_round(s, 1, g, (1, 2))
    before = _flasc_snapshot(s)
    real = type(s).aggregate_updates

    def poisoned(self, rnd, state, updates):
        out = real(self, rnd, state, updates)
        out["fc.bias"] = out["fc.bias"] * np.float32(np.nan)
        return out

    monkeypatch.setattr(type(s), "aggregate_updates", poisoned)
    assert _flasc_round(s, 2, s1, (1, 2)) is None
    assert "not finite" in s.round_record(2)["rejected"]
    _assert_same(before, _flasc_snapshot(s))


def test_flasc_pseudo_gradient_over_the_bound_is_rejected(task_identity):
    """The pseudo-gradient is checked against the round's bound before the step."""
    s = make("flasc", update_norm_bound=1e-3, norm_bound_action="clip")
    g = toy(0)
    msgs = configure(s, 1, g, (1, 2))
    s._optimizer(g)
    s.stats[1].norm_bound = 1e-3
    ups = [honest(s, m, 1, i, scale=1.0) for i, m in enumerate(msgs)]
    from fedlora.strategies.base import ClientUpdate, RejectRound
    before = _flasc_snapshot(s)
    with pytest.raises(RejectRound, match="over the round's bound"):
        s.aggregate_updates(1, g, [ClientUpdate(n, u, 1, {}) for n, u in zip((1, 2), ups)])
    _assert_same(before, _flasc_snapshot(s))


# ------------------------------------------------------------------------- 4. query answers
class AnswerGrid(FakeGrid):
    """Answers the tier query with the given metric values per node."""

    def __init__(self, answers):
        super().__init__(list(answers))
        self.answers = answers

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            r = Message(RecordDict({METRICS_KEY: MetricRecord(self.answers[node])}), reply_to=m)
            out.append(r)
        return out


def test_bad_partition_ids_exclude_the_node_and_never_crash(task_identity):
    answers = {1: {"tier": 0, "partition-id": 0}, 2: {"tier": 0, "partition-id": float("nan")},
               3: {"tier": 0, "partition-id": float("inf")}, 4: {"tier": 0, "partition-id": -7},
               5: {"tier": 0, "partition-id": 2.5}, 6: {"tier": 0, "partition-id": 1e300},
               7: {"tier": 0, "partition-id": [1, 2]}, 8: {"tier": 0, "partition-id": 1},
               9: {"tier": 0}}
    s = make("flocora")
    grid = AnswerGrid(answers)
    msgs = configure(s, 1, toy(0), None, grid)
    assert sorted(node_of(m) for m in msgs) == [1, 8, 9]       # 9: no partition-id = unknown
    rec = s.round_record(1)
    excluded = {e["node"]: e["reason"] for e in rec["excluded_nodes"]}
    assert sorted(excluded) == [2, 3, 4, 5, 6, 7]
    assert "not finite" in excluded[2] and "not an integer" in excluded[5]
    assert "outside" in excluded[4] and "outside" in excluded[6]
    msgs = configure(s, 2, toy(0), None, grid)                 # asked once, still left out
    assert sorted(node_of(m) for m in msgs) == [1, 8, 9]


def test_tier_minus_5_gets_tier_0(task_identity):
    answers = {1: {"tier": -5, "partition-id": 0}, 2: {"tier": 1, "partition-id": 1},
               3: {"tier": float("nan"), "partition-id": 2}}
    s = make("flocora", tier_codec_up="affine:8,fp16")
    msgs = configure(s, 1, toy(0), None, AnswerGrid(answers))
    by_node = {node_of(m): m.content["config"] for m in msgs}
    assert by_node[1]["tier"] == 0 and by_node[1]["codec-up"] == "affine:8"
    assert by_node[2]["codec-up"] == "fp16" and by_node[3]["tier"] == 0
    reasons = {e["node"]: e["reason"] for e in s.round_record(1)["excluded_nodes"]}
    assert sorted(reasons) == [1, 3] and "tier 0 used" in reasons[1]


# ------------------------------------------------------------------------- 5. HetLoRA rank
@pytest.mark.parametrize("rank", [float("nan"), 0, -3, R + 1, 1.5])
def test_hetlora_bad_rank_dropped(task_identity, rank):
    s = make("hetlora", rank_budget=R)
    msgs = configure(s, 1, toy(0), (1, 2))
    pruned = truncate_ranks(honest(s, msgs[0], 1, 0), 2)  # a node that pruned to rank 2
    arrays, _ = s.aggregate_train(1, [reply(msgs[0], pruned, rank=2.0),
                                      reply(msgs[1], honest(s, msgs[1], 1, 1), rank=rank)])
    rec = s.round_record(1)
    assert arrays is not None and rec["clients"] == 1 and rec["dropped_reasons"][0]["node"] == 2
    assert "rank" in rec["dropped_reasons"][0]["reason"]
    assert s.client_rank(1) == 2 and s.client_rank(2) == R


# ------------------------------------------------------------------------- 6. codec enforced
def test_flasc_dense_reply_when_asked_topk_is_dropped(task_identity):
    s = make("flasc", density_up=0.1, server_opt="avg")
    g = toy(0)
    msgs = configure(s, 1, g, (1, 2, 3))
    assert msgs[0].content["config"]["codec-up"] == "topk:0.1"
    delta = honest(s, msgs[1], 1, 1)
    dense = reply(msgs[1], delta, spec="fp32")
    # a wire-v1 Array (spec also in the stype): refused by version, before its payload is read
    payload = bytes(encode_record(delta, "topk:0.1")["payload"].data)
    old_wire = reply(msgs[2], record=ArrayRecord({"payload": Array(
        dtype="uint8", shape=(len(payload),), stype="fedlora/v1;topk:0.1", data=payload)}))
    good = honest(s, msgs[0], 1, 0)
    arrays, _ = s.aggregate_train(1, [reply(msgs[0], good), dense, old_wire])
    rec = s.round_record(1)
    assert rec["clients"] == 1 and [d["node"] for d in rec["dropped_reasons"]] == [2, 3]
    reasons = [d["reason"] for d in rec["dropped_reasons"]]
    assert "encoded with 'fp32'" in reasons[0] and "'topk:0.1'" in reasons[0]
    assert "wire version 'fedlora/v2'" in reasons[1]
    sent = decode_record(encode_record(good, "topk:0.1"))
    new = arrays_to_state(arrays)
    for k in g:
        np.testing.assert_allclose(new[k], g[k] + sent[k], rtol=1e-6, atol=1e-7)


def test_other_node_input_dropped_with_reason(task_identity):
    """Non-finite or list-NaN metrics, a fractional or huge num-examples, params-up out of
    range, a second reply from one node, a reply from a node not sampled: each dropped, the
    honest reply aggregated."""
    s = make("flocora")
    g = toy(0)
    msgs = configure(s, 1, g, (1, 2, 3, 4, 5, 6))
    good = honest(s, msgs[0], 1, 0)
    stranger = Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.TRAIN,
                       dst_node_id=99)
    replies = [reply(msgs[0], good),
               reply(msgs[1], good, **{"train-loss": float("inf")}),
               reply(msgs[2], good, n=10.5),
               reply(msgs[3], good, n=2.0 ** 60),
               reply(msgs[4], good, **{"params-up": 1e12}),
               reply(msgs[5], good, **{"curve": [1.0, float("nan")]}),
               reply(msgs[0], good),
               reply(stranger, good, spec="fp32")]
    arrays, metrics = s.aggregate_train(1, replies)
    rec = s.round_record(1)
    reasons = [(d["node"], d["reason"]) for d in rec["dropped_reasons"]]
    assert sorted(n for n, _ in reasons) == [1, 2, 3, 4, 5, 6, 99] and rec["clients"] == 1
    assert all(r for _, r in reasons)
    why = dict(reasons)
    assert "second reply" in why[1] and "not sent" in why[99] and "params-up" in why[5]
    assert "train-loss" in why[2] and "num-examples" in why[3] and "num-examples" in why[4]
    new = arrays_to_state(arrays)
    for k in g:
        np.testing.assert_array_equal(new[k], good[k])
    assert math.isfinite(metrics["train-loss"])


# ------------------------------------------------------------------------- 7. robust aggregation
def test_median_and_trimmed_mean_match_numpy():
    rng = np.random.default_rng(0)
    ups = [OrderedDict(w=rng.standard_normal((3, 4)).astype(np.float32)) for _ in range(7)]
    ups[2]["w"][0, 0] = 1e30
    stack = np.stack([u["w"].astype(np.float64) for u in ups])
    np.testing.assert_array_equal(guard.robust_mean(ups, "median")["w"],
                                  np.median(stack, axis=0).astype(np.float32))
    np.testing.assert_array_equal(guard.robust_mean(ups[:6], "median")["w"],  # even count
                                  np.median(stack[:6], axis=0).astype(np.float32))
    srt = np.sort(stack, axis=0)
    np.testing.assert_allclose(guard.robust_mean(ups, "trimmed-mean", 0.2)["w"],
                               srt[1:6].mean(axis=0).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(guard.robust_mean(ups, "trimmed-mean", 0.3)["w"],
                               srt[2:5].mean(axis=0).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(guard.robust_mean(ups, "trimmed-mean", 0.0)["w"],
                               stack.mean(axis=0).astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("method", AVERAGING)
@pytest.mark.parametrize("how", ["median", "trimmed-mean"])
def test_robust_aggregation_in_the_methods(task_identity, method, how):
    """Five replies, one of 1e30 (automatic bound off): the coordinate-wise median / trimmed
    mean of the uploads is the new global (FFA-LoRA keeps its frozen A)."""
    s = make(method, aggregation=how, norm_bound_factor=0.0)
    g = toy(0)
    msgs = configure(s, 1, g, (1, 2, 3, 4, 5))
    ups = [honest(s, m, 1, i, scale=0.5) for i, m in enumerate(msgs[:4])]
    ups.append(hostile_values(s, 1))
    arrays, _ = s.aggregate_train(1, [reply(m, u, n) for m, u, n in
                                      zip(msgs, ups, (10, 20, 30, 40, 50))])
    new = arrays_to_state(arrays)
    for k in SHAPES:
        if k not in ups[0]:
            np.testing.assert_array_equal(new[k], g[k])
            continue
        stack = np.sort(np.stack([u[k].astype(np.float64) for u in ups]), axis=0)
        want = np.median(stack, axis=0) if how == "median" else stack[1:4].mean(axis=0)
        np.testing.assert_allclose(new[k], want.astype(np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["flasc", "lora-a2", "flexlora", "hetlora"])
def test_robust_aggregation_refused_where_it_does_not_apply(task_identity, method):
    s = make(method, aggregation="median")
    with pytest.raises(ValueError, match="aggregation='median'"):
        s.start(FakeGrid([1]), state_to_arrays(toy(0)), num_rounds=1)


@pytest.mark.parametrize("kw", [{"aggregation": "mode"}, {"trim_fraction": 0.5},
                                {"norm_bound_action": "drop"}, {"max_weight_ratio": -1.0},
                                {"update_norm_bound": float("nan")}])
def test_bad_robustness_settings_fail_at_start(task_identity, kw):
    s = make("flocora", **kw)
    with pytest.raises(ValueError, match="run-config"):
        s.start(FakeGrid([1]), state_to_arrays(toy(0)), num_rounds=1)


# ------------------------------------------------------------------------- 8. a whole run
class HostileGrid(FakeGrid):
    """Nodes 1-3 honest, 4 sends 1e30, 5 claims 1e15 examples, 6 answers in the wrong codec,
    7 reports a NaN loss, 8 a NaN partition-id (never sampled), 9 an error."""

    def __init__(self, strategy):
        super().__init__(list(range(1, 10)))
        self.partition_of[8] = float("nan")
        self.s = strategy
        self.train_rounds = 0

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return super().send_and_receive(messages, timeout)
        self.train_rounds += 1
        out = []
        for m in messages:
            node, rnd = node_of(m), int(m.content["config"]["server-round"])
            assert node != 8
            up = honest(self.s, m, rnd, 1000 * rnd + node)
            if node == 4:
                out.append(reply(m, hostile_values(self.s, rnd)))
            elif node == 5:
                out.append(reply(m, up, n=1e15))
            elif node == 6:
                out.append(reply(m, up, spec="fp16"))
            elif node == 7:
                out.append(reply(m, up, **{"train-loss": float("nan")}))
            elif node == 9:
                from flwr.app import Error
                out.append(Message(Error(code=0, reason="boom"), reply_to=m))
            else:
                out.append(reply(m, up))
        return out


@pytest.mark.parametrize("method", ["flocora", "flasc"])
def test_a_run_with_hostile_nodes_completes(task_identity, method):
    """Flower's own run loop (Strategy.start), three rounds, six misbehaving nodes of nine: the
    run completes, every round aggregates the honest replies, and the global stays within the
    rounds' bounds of where it started."""
    s = make(method)
    grid = HostileGrid(s)
    g = toy(0)
    result = s.start(grid, state_to_arrays(g), num_rounds=3, timeout=10)
    assert grid.train_rounds == 3
    final = arrays_to_state(result.arrays)
    assert all(np.all(np.isfinite(v)) for v in final.values())
    total_bound = 0.0
    for rnd in (1, 2, 3):
        rec = s.round_record(rnd)
        assert rec["clients"] == 5 and rec["failures"] == 1 and rec["rejected"] == ""
        assert sorted(d["node"] for d in rec["dropped_reasons"]) == [6, 7]
        assert [c["node"] for c in rec["clipped"]] == [4]
        assert [c["node"] for c in rec["capped_weights"]] == [5]
        total_bound += rec["norm_bound"]
    assert [e["node"] for e in s.round_record(1)["excluded_nodes"]] == [8]
    assert dist(final, g) <= (total_bound if method == "flocora" else 3 * 2 * s.cfg.server_lr
                              * math.sqrt(sum(np.prod(v) for v in SHAPES.values())))


# ------------------------------------------------------------------------- run folders


@pytest.mark.parametrize("name", ["../../x", "/tmp/fedlora-escape", "a/b", "..", ".", "a\\b",
                                  "x\x00y"])
def test_run_name_cannot_escape_run_dir(tmp_path, name):
    from fedlora.server_app import resolve_run_dir

    with pytest.raises(ValueError, match="run-name"):
        resolve_run_dir(RunConfig(run_dir=str(tmp_path), run_name=name))
    ok = resolve_run_dir(RunConfig(run_dir=str(tmp_path), run_name="seed-1"))
    assert ok == tmp_path.resolve() / "seed-1"


def test_existing_run_folder_is_never_truncated(tmp_path, sample_dir, task_identity):
    """A second run with the same run-name is refused before anything is written; the first
    run's records are untouched."""
    from fedlora.server_app import run

    d = tmp_path / "taken"
    d.mkdir()
    (d / "rounds.jsonl").write_text('{"round": 0}\n')
    cfg = RunConfig(run_dir=str(tmp_path), run_name="taken", dataset="npz", data_dir=sample_dir,
                    feature_maps=8, lora_rank=2)
    with pytest.raises(ValueError, match="already holds a run"):
        run(FakeGrid([1, 2]), cfg)
    assert (d / "rounds.jsonl").read_text() == '{"round": 0}\n'


# ------------------------------------------------------------------------- issue 34
# 1. a bound with one or two replies (the trusted bound: guard.trusted_bound)
F32_MAX = np.finfo(np.float32).max


def _round(s, rnd, state, nodes, attack=None, attacker=None):
    """One round on ``nodes`` (replies honest; ``attacker``'s — default the last node's — is
    ``attack``(s, rnd, node) instead): (new global or None, record)."""
    msgs = configure(s, rnd, state, nodes, FakeGrid(list(nodes), {n: n for n in nodes}))
    replies = []
    for i, m in enumerate(msgs):
        bad = attack is not None and node_of(m) == (attacker or nodes[-1])
        replies.append(reply(m, attack(s, rnd, node_of(m)) if bad
                             else honest(s, m, rnd, 100 * rnd + i)))
    arrays, _ = s.aggregate_train(rnd, replies)
    return (None if arrays is None else arrays_to_state(arrays)), s.round_record(rnd)


def _huge(value):
    return lambda s, rnd, node: hostile_values(s, rnd, value, node=node)


@pytest.mark.parametrize("method", ALL)
def test_one_or_two_replies_are_bounded(task_identity, method):
    """Rounds of one and two replies, one node sending 1e30 or float32's max: its update is
    clipped to the trusted bound — a first round of one reply: ``norm-bound-global`` × the
    global's norm; then 5 × the largest of the recent trusted medians and, with two replies,
    the round's smaller norm (the honest one: the attacker cannot raise it) — and the global
    moves at most that far (before: ~5e29), every method."""
    s = make(method)
    state = toy(0)
    bounds = []
    for rnd, nodes, value in ((1, (2,), HUGE), (2, (1, 2), F32_MAX), (3, (2,), HUGE),
                              (4, (1, 2), HUGE), (5, (1, 2), F32_MAX)):
        history = list(s.norm_history)
        new, rec = _round(s, rnd, state, nodes, attack=_huge(value))
        norms = s.stats[rnd].update_norms
        assert rec["rejected"] == "" and rec["dropped"] == 0
        assert [c["node"] for c in rec["clipped"]] == [2] and rec["clipped"][0]["norm"] > 1e30
        trusted = history + ([min(norms)] if len(norms) == 2 else [])
        want = 5 * max(trusted) if trusted else guard.update_norm(state)   # round 1: 1 × ‖G‖
        assert rec["norm_bound"] == pytest.approx(want)
        assert all(np.all(np.isfinite(v)) for v in new.values())
        if method in AVERAGING or method == "lora-a2":
            assert dist(new, state) <= rec["norm_bound"] * (1 + 1e-5)
        elif method == "flasc":
            assert not s._non_finite()
        assert s.norm_history == history + ([min(norms)] if len(norms) == 2 else [])
        bounds.append(rec["norm_bound"])
        state = new
    honest_norms = [n for r in (2, 4, 5) for n in s.stats[r].update_norms if n < 1e29]
    assert max(bounds[1:]) <= 5 * max(honest_norms) * (1 + 1e-9)   # never raised by the attack
    if method in ("flexlora", "hetlora"):            # factors rebuilt by SVD: nowhere near 1e30
        assert max(float(np.abs(v).max()) for v in state.values()) < 100


def test_trusted_bound_rules():
    """The trusted bound: factor × the largest of the last ``window`` medians and this round's
    own lower median; none (or all 0): the global's norm × ``norm-bound-global``; window or
    factor 0: no bound. A round adds the lower median of its norms (of two: the smaller), one
    reply adds nothing."""
    g = lambda: 4.0  # noqa: E731
    assert guard.trusted_bound([1.0, 2.0, 0.5], 5.0, 5, 1.0, g) == 10.0
    assert guard.trusted_bound([1.0, 2.0, 0.5], 5.0, 5, 1.0, g, current=0.1) == 10.0
    assert guard.trusted_bound([1.0], 5.0, 5, 1.0, g, current=3.0) == 15.0
    assert guard.trusted_bound([], 5.0, 5, 1.0, g, current=0.2) == 1.0
    assert guard.trusted_bound([1.0, 2.0, 0.5], 5.0, 1, 1.0, g) == 2.5
    assert guard.trusted_bound([], 5.0, 5, 1.0, g) == 4.0
    assert guard.trusted_bound([0.0], 5.0, 5, 0.5, g) == 2.0
    assert guard.trusted_bound([], 5.0, 5, 0.0, g) is None
    assert guard.trusted_bound([1.0], 5.0, 0, 1.0, g) is None
    assert guard.trusted_bound([1.0], 0.0, 5, 1.0, g) is None
    assert guard.trusted_median([1e30, 1.0]) == 1.0
    assert guard.trusted_median([3.0, 1.0, 2.0, 1e30]) == 2.0
    assert guard.trusted_median([1e30]) is None


def test_trusted_bound_off_and_checkpointed(task_identity):
    """``norm-bound-history=0`` turns the bound of small rounds off (the attack of issue 34
    goes through, as before); the history survives a checkpoint; a rejected round adds
    nothing to it."""
    s = make("flocora", norm_bound_history=0)
    new, rec = _round(s, 1, toy(0), (1, 2), attack=_huge(HUGE))
    assert rec["norm_bound"] is None and float(np.abs(new["fc.bias"]).max()) > 1e29
    new, rec = _round(make("flocora"), 1, toy(0), (1, 2), attack=_huge(HUGE))   # on: bounded
    assert rec["norm_bound"] < 1 and float(np.abs(new["fc.bias"]).max()) < 10
    s = make("flocora")
    state, _ = _round(s, 1, toy(0), (1, 2))
    saved = s.state_dict()
    assert saved["norm_history"] == s.norm_history and len(s.norm_history) == 1
    twin = make("flocora")
    twin.load_state_dict(saved)
    assert twin.norm_history == s.norm_history
    s.aggregate_updates = lambda *a: {"fc.bias": np.full(D, np.nan, np.float32)}
    assert _round(s, 2, state, (1, 2))[0] is None and s.norm_history == twin.norm_history


@pytest.mark.parametrize("opt", ["adamw", "sgd", "avg"])
def test_flasc_recovers_under_every_server_opt(task_identity, opt):
    """FLASC, two nodes, one sends float32's max: the update is clipped to the trusted bound, the
    step is taken (not rejected: AdamW no longer stalls while the attack lasts), optimizer state
    stays finite, and the next honest rounds move the global as they should (before: avg/sgd
    took the 1.7e38 step and later rounds moved nothing)."""
    s = make("flasc", server_opt=opt, server_lr=0.01 if opt != "avg" else 1.0)
    g = toy(0)
    s1, _ = _round(s, 1, g, (1, 2))
    s2, rec = _round(s, 2, s1, (1, 2), attack=_huge(F32_MAX))
    assert s2 is not None and rec["rejected"] == "" and [c["node"] for c in rec["clipped"]] == [2]
    assert not s._non_finite() and dist(s2, s1) < 1.0
    state = s2
    for rnd in (3, 4):
        new, rec = _round(s, rnd, state, (1, 2))
        assert new is not None and rec["rejected"] == "" and rec["clipped"] == []
        assert 0 < dist(new, state) and not s._non_finite()
        state = new


@pytest.mark.parametrize("method", ALL)
def test_honest_records_same_with_trusted_bound_on_and_off(task_identity, method):
    """Where the bound does not bind, it changes nothing: three rounds of two honest replies,
    the trusted bound on and off, give bit-identical globals and equal records but for
    ``norm_bound`` (a number vs None) and the timing."""
    runs = []
    for history in (5, 0):
        s = make(method, norm_bound_history=history)
        state, out = toy(0), []
        for rnd in (1, 2, 3):
            state, rec = _round(s, rnd, state, (1, 2))
            out.append((state, rec))
        runs.append(out)
    for (a, ra), (b, rb) in zip(*runs):
        assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
        assert ra["norm_bound"] is not None and rb["norm_bound"] is None and ra["clipped"] == []
        skip = {"norm_bound", "round_s"}
        assert {k: v for k, v in ra.items() if k not in skip} == \
            {k: v for k, v in rb.items() if k not in skip}


# 2. rank budgets
def _over_budget(s, rnd, node):
    """Every rank slice of the factors, small values: what a node ignoring its budget sends."""
    rng = np.random.default_rng(node)
    return OrderedDict((k, (0.01 * rng.standard_normal(shape)).astype(np.float32))
                       for k, shape in s.upload_shapes(rnd).items())


def test_lora_a2_refuses_more_rank_slices_than_its_budget(task_identity):
    """LoRA-A2, ``rank-budget=1`` (2 slices over 2 modules): a reply carrying every slice (8) is
    dropped with the count and the budget in the reason, though it is larger on the wire; a
    node whose tier's ``tier-rank`` is 4 may send all 8."""
    s = make("lora-a2", rank_budget=1)
    msgs = configure(s, 1, toy(0), (1, 2))
    good, fat = reply(msgs[0], honest(s, msgs[0], 1, 0)), reply(msgs[1], _over_budget(s, 1, 2))
    assert payload_size(fat) > 2 * payload_size(good)
    arrays, _ = s.aggregate_train(1, [good, fat])
    rec = s.round_record(1)
    assert arrays is not None and rec["clients"] == 1
    assert [d["node"] for d in rec["dropped_reasons"]] == [2]
    assert "8 rank slices uploaded" in rec["dropped_reasons"][0]["reason"]
    assert "allows 2" in rec["dropped_reasons"][0]["reason"]
    answers = {1: {"tier": 0, "partition-id": 0}, 2: {"tier": 1, "partition-id": 1}}
    s = make("lora-a2", rank_budget=1, tier_rank="1,4")
    msgs = configure(s, 1, toy(0), None, AnswerGrid(answers))
    by = {node_of(m): m for m in msgs}
    s.aggregate_train(1, [reply(by[1], _over_budget(s, 1, 1)), reply(by[2], _over_budget(s, 1, 2))])
    rec = s.round_record(1)
    assert rec["clients"] == 1 and [d["node"] for d in rec["dropped_reasons"]] == [1]


def payload_size(msg):
    from fedlora.wire import payload_bytes
    return payload_bytes(msg.content.array_records[ADAPTER_KEY])


@pytest.mark.parametrize("method", ["flexlora", "hetlora"])
def test_rank_slices_beyond_the_node_rank_are_refused(task_identity, method):
    """FlexLoRA / HetLoRA at ``rank-budget=2``: a reply with a non-zero slice at rank index 2 or
    beyond is dropped, naming the slice and the node's rank; HetLoRA also holds a node to the
    rank it reports having pruned to."""
    s = make(method, rank_budget=2)
    msgs = configure(s, 1, toy(0), (1, 2))
    arrays, _ = s.aggregate_train(1, [reply(msgs[0], honest(s, msgs[0], 1, 0)),
                                      reply(msgs[1], _over_budget(s, 1, 2))])
    rec = s.round_record(1)
    assert arrays is not None and rec["clients"] == 1
    assert [d["node"] for d in rec["dropped_reasons"]] == [2]
    assert "rank slice 2, beyond the node's rank 2" in rec["dropped_reasons"][0]["reason"]
    if method == "hetlora":
        msgs = configure(s, 2, toy(0), (1, 2))
        s.aggregate_train(2, [reply(m, honest(s, m, 2, i), rank=1.0) for i, m in enumerate(msgs)])
        rec = s.round_record(2)
        assert rec["clients"] == 0 and all("beyond the node's rank 1" in d["reason"]
                                           for d in rec["dropped_reasons"])


# 3. one node per partition-id
class ClaimGrid(AnswerGrid):
    """AnswerGrid whose node set can change between rounds (nodes leave, join)."""

    def get_node_ids(self):
        return [n for n in self.nodes if n not in getattr(self, "gone", set())]


def test_one_node_per_partition_id(task_identity):
    """Two nodes claim partition 0 in one query: the smaller node id keeps it, the other is
    left out of partition sampling (recorded with the owner's id), so over 40 rounds the samples
    are exactly those of the federation without the spoofer: it can neither share a slot nor
    pick one. A later claim of a held partition is refused; a claim of one whose owner left
    the federation passes to the claimant (recorded)."""
    honest_answers = {3: {"tier": 0, "partition-id": 0}, 7: {"tier": 0, "partition-id": 1},
                      8: {"tier": 0, "partition-id": 2}, 9: {"tier": 0, "partition-id": 3}}
    spoofed = {**honest_answers, 5: {"tier": 0, "partition-id": 0}}
    s, ref = make("flocora", fraction_train=0.5), make("flocora", fraction_train=0.5)
    grid, ref_grid = ClaimGrid(spoofed), ClaimGrid(honest_answers)
    for rnd in range(1, 41):
        got = sorted(node_of(m) for m in configure(s, rnd, toy(0), None, grid))
        want = sorted(node_of(m) for m in configure(ref, rnd, toy(0), None, ref_grid))
        assert got == want and 5 not in got
    rec = s.round_record(1)
    assert [e["node"] for e in rec["excluded_nodes"]] == [5]
    assert "partition-id 0 is already claimed by node 3" in rec["excluded_nodes"][0]["reason"]
    assert s.partitions[3] == 0 and 5 not in s.partitions
    grid.nodes.append(11)                             # joins later, claims a held partition
    grid.answers[11] = {"tier": 0, "partition-id": 1}
    configure(s, 41, toy(0), None, grid)
    assert "already claimed by node 7" in s.round_record(41)["excluded_nodes"][0]["reason"]
    grid.gone = {7}                                   # the owner of partition 2 leaves
    grid.nodes.append(12)
    grid.answers[12] = {"tier": 0, "partition-id": 2}
    grid.gone.add(8)
    configure(s, 42, toy(0), None, grid)
    rec = s.round_record(42)
    assert s.partitions[12] == 2 and 8 not in s.partitions
    assert rec["excluded_nodes"] == [{"node": 8, "reason": "partition-id 2 passed to node 12: "
                                      "this node is no longer connected"}]


# 5. replies name the round they answer
def test_stale_duplicate_and_unsolicited_replies_dropped_apart(task_identity):
    """``download=delta``. Round 2: node 1 answers twice (a duplicate) and also resends its
    round-1 reply (stale), a node never sent anything replies, and one reply names no message
    (forged): each is dropped with its reason and its bytes go to ``bytes_up_dropped``, not
    ``bytes_up``; node 1's own reply is aggregated and its download copy settles (round 3
    sends it a delta, not a full download)."""
    from fedlora.wire import message_bytes

    s = make("flocora", download="delta")
    g = toy(0)
    m1 = configure(s, 1, g, (1, 2))
    old = reply(m1[0], honest(s, m1[0], 1, 0))
    s1 = arrays_to_state(s.aggregate_train(1, [old, reply(m1[1], honest(s, m1[1], 1, 1))])[0])
    m2 = configure(s, 2, s1, (1, 2))
    assert s.round_record(2)["full_downloads"] == 0
    own = [reply(m, honest(s, m, 2, 10 + i)) for i, m in enumerate(m2)]
    stranger = Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.TRAIN,
                       dst_node_id=99)
    forged = reply(m2[1], honest(s, m2[1], 2, 5))
    forged.metadata.__dict__["_reply_to_message_id"] = "f" * 64
    extra = [reply(m2[0], honest(s, m2[0], 2, 10)), old,
             reply(stranger, honest(s, m2[0], 2, 3), spec="fp32"), forged]
    arrays, _ = s.aggregate_train(2, [own[0], *extra, own[1]])
    rec = s.round_record(2)
    assert arrays is not None and rec["clients"] == 2 and rec["dropped"] == 4
    why = [(d["node"], d["reason"]) for d in rec["dropped_reasons"]]
    assert sorted(n for n, _ in why) == [1, 1, 2, 99]
    text = " | ".join(r for _, r in why)
    assert "second reply" in text and "stale reply: it answers round 1's train message" in text
    assert "not sent a train message" in text and "stale or forged" in text
    assert rec["bytes_up"] == sum(message_bytes(m, hashed=False) for m in own)
    assert rec["bytes_up_dropped"] == sum(message_bytes(m, hashed=False) for m in extra)
    configure(s, 3, arrays_to_state(arrays), (1, 2))
    assert s.round_record(3)["full_downloads"] == 0      # both copies settled


def test_the_superlinks_error_reply_for_a_lost_node_is_that_nodes_failure(task_identity):
    """When a node is lost mid-round, Flower's SuperLink writes the error reply itself (source
    SUPERLINK_NODE_ID, answering the lost node's train message): it is that node's failure, not
    a stray reply; an error reply from the SuperLink answering no message of this round is a
    stray."""
    from flwr.app import Error
    from flwr.common.constant import SUPERLINK_NODE_ID

    s = make("fedavg")
    msgs = configure(s, 1, toy(0), (3, 4, 5))
    out = [reply(m, honest(s, m, 1, node_of(m))) for m in msgs if node_of(m) != 5]
    lost = next(m for m in msgs if node_of(m) == 5)
    err = Message(Error(code=0, reason="Node Unavailable: no heartbeat"), reply_to=lost)
    err.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    forged = Message(Error(code=0, reason="nope"), reply_to=msgs[0])
    forged.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    forged.metadata.__dict__["_reply_to_message_id"] = "f" * 64
    assert err.metadata.src_node_id == forged.metadata.src_node_id == SUPERLINK_NODE_ID
    assert forged.metadata.reply_to_message_id == "f" * 64
    s.aggregate_train(1, out + [err, forged])
    rec = s.round_record(1)
    assert rec["clients"] == 2 and rec["failures"] == 1
    assert rec["failure_reasons"][0]["node"] == 5
    assert "heartbeat" in rec["failure_reasons"][0]["reason"]
    assert [d["node"] for d in rec["dropped_reasons"]] == [SUPERLINK_NODE_ID]
