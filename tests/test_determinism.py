"""Same replies in any arrival order → the same global model, bit for bit (issue 30, item 3).

Each case runs two rounds of a method's server half three times, the replies of every round
handed to ``aggregate_train`` in a different order (as the machine's load orders them), and
checks that the global tensors, the strategy's checkpoint state (FLASC's optimizer, HetLoRA's
ranks, the delta downloads' per-node copies, DP's accountant and noise generator) and the round
records are identical. The replies' values span twelve orders of magnitude, so float64 sums
taken in another order do differ in float32: the control test shows that without the canonical
order the same cases give different bits.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import pytest

from fedlora.checkpoint import server_state
from fedlora.privacy import ServerPrivacy
from fedlora.strategies.base import FedLoraStrategy, arrays_to_state

from conftest import FakeGrid
from fedlora.adapters import truncate_ranks
from test_hostile import ALL, configure, honest, make, reply, toy, within_budget
from test_resume import assert_same_nested as same

NODES = (31, 17, 52, 8, 44)                      # node ids not in partition order
PARTS = {31: 2, 17: 4, 52: 0, 8: 3, 44: 1}
EXAMPLES = {31: 10, 17: 25, 52: 7, 8: 40, 44: 7}
ORDERS = [(0, 1, 2, 3, 4), (4, 3, 2, 1, 0), (2, 0, 4, 1, 3)]
OFF = {"norm_bound_factor": 0.0}                 # no automatic bound: nothing is clipped
DP = {"dp": "central", "dp_clip": 1e7, "dp_noise_multiplier": 0.5, **OFF}

CASES = [(m, {"stream_aggregation": s, **OFF}) for m in ALL for s in (True, False)] + [
    ("flocora", {"upload": "delta", "stream_aggregation": True, **OFF}),
    ("flocora", {"upload": "delta", "stream_aggregation": False, **OFF}),
    ("fl-lora", {"upload": "delta", "codec_up": "topk:0.3", **OFF}),
    ("fedavg", {"download": "delta", "codec_down": "affine:8", **OFF}),
    ("flocora", {"aggregation": "median", **OFF}),
    ("flocora", {"aggregation": "trimmed-mean", "trim_fraction": 0.2, **OFF}),
    ("flocora", {"upload": "delta", **DP}),
    ("flasc", {"server_opt": "avg", **DP}),
    ("lora-a2", DP),
    ("flasc", {"density_up": 0.25, "server_opt": "adamw", **OFF}),
    ("flocora", {"norm_bound_factor": 1.5}),        # the largest replies clipped (stream: step 3)
    ("hetlora", {"tier_rank": "2,4", "tier_map": "0,1,0,1,0", **OFF}),
]


def _id(case):
    method, kw = case
    return method + "-" + "-".join(f"{k}={v}" for k, v in kw.items() if k not in OFF)


def wide(s, msg, rnd, node):
    """A node's upload: what it received (weights) or nothing (updates), plus values spanning
    1e-6..1e6 seeded by round and partition; partitions 0 and 1 (equal weights) also carry
    +1e9·r and −1e9·r, which cancel exactly when added one after the other and absorb the
    small values' low bits when another reply comes between them."""
    rng = np.random.default_rng([rnd, PARTS[node]])
    big = np.random.default_rng(rnd)
    base = honest(s, msg, rnd, 0, scale=0.0)
    out = OrderedDict()
    for k, shape in s.upload_shapes(rnd).items():
        d = rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 6, shape)
        pm = {0: 1e9, 1: -1e9}.get(PARTS[node], 0.0) * big.standard_normal(shape)
        out[k] = (base[k] + d + pm.astype(np.float32)).astype(np.float32)
    # within the node's rank budget (LoRA-A2, FlexLoRA) and the rank 2 HetLoRA nodes report
    out = within_budget(s, node, out)
    return truncate_ranks(out, 2) if s.name == "hetlora" else out


def run_rounds(method, kw, order, canonical=True, rounds=2):
    """Global tensors and checkpoint state after each round, and the round records."""
    s = make(method, **kw)
    s.privacy = ServerPrivacy.for_strategy(s, seed=7)  # seeded noise (tests only)
    if not canonical:  # what aggregate_train did before issue 30: arrival order
        s.canonical_order = lambda replies: list(replies)
    g = toy(0)
    out = []
    grid = FakeGrid(list(NODES), partition_of=PARTS)
    for rnd in range(1, rounds + 1):
        msgs = configure(s, rnd, g, NODES, grid)
        by_node = {m.metadata.dst_node_id: m for m in msgs}
        replies = []
        for node in sorted(by_node, key=PARTS.get):
            m = by_node[node]
            extra = {"rank": 2.0} if method == "hetlora" else {}
            replies.append(reply(m, wide(s, m, rnd, node), n=EXAMPLES[node], **extra))
        arrays, _ = s.aggregate_train(rnd, [replies[i] for i in order])
        assert arrays is not None, s.round_record(rnd)
        g = arrays_to_state(arrays)
        rec = s.round_record(rnd)
        rec.pop("round_s")
        out.append((g, server_state(s, g), rec))
    return out


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_reply_order_does_not_change_a_bit(task_identity, case):
    method, kw = case
    runs = [run_rounds(method, kw, order) for order in ORDERS]
    for other in runs[1:]:
        for (g0, st0, rec0), (g1, st1, rec1) in zip(runs[0], other):
            same(g0, g1, "global")
            same(st0["strategy"], st1["strategy"], "strategy")
            same(st0.get("privacy"), st1.get("privacy"), "privacy")
            same(rec0, rec1, "record")
    assert runs[0][-1][2]["clients"] == 5


def test_without_the_canonical_order_the_same_replies_give_other_bits(task_identity):
    """The control: with replies aggregated in arrival order (the code before issue 30) the
    same replies in another order give another global model, on the streamed and the
    decode-all mean, LoRA-A2's rank-slice sums and FLASC's pseudo-gradient, so the test above
    could fail. (FlexLoRA's SVD and DP's clip and noise hide these inputs' order effects; they
    sum in float64 in reply order all the same.)"""
    differ = []
    for method, kw in [("flocora", {"stream_aggregation": True, **OFF}),
                       ("flocora", {"stream_aggregation": False, **OFF}),
                       ("lora-a2", OFF), ("flasc", {"server_opt": "avg", **OFF})]:
        a, *others = (run_rounds(method, kw, order, canonical=False, rounds=1)[0][0]
                      for order in ORDERS)
        if any(not np.array_equal(a[k], b[k]) for b in others for k in a):
            differ.append(method)
    assert differ == ["flocora", "flocora", "lora-a2", "flasc"]


def test_canonical_order_is_partition_then_node_id(task_identity):
    """Known partitions first in partition order, then nodes whose partition is unknown by id;
    whatever the arrival order."""
    s = make("flocora")
    msgs = configure(s, 1, toy(0), (31, 17, 52, 8, 44), FakeGrid([31, 17, 52, 8, 44]))
    s.nodes.partitions.update({31: 2, 17: 0, 52: -1, 8: 1})
    s.nodes.partitions.pop(44, None)
    replies = [reply(m, None, record=m.content["adapter"]) for m in msgs]
    for perm in itertools.permutations(replies):
        got = [r.metadata.src_node_id for r in s.canonical_order(perm)]
        assert got == [17, 8, 31, 44, 52]


def test_no_method_overrides_aggregate_train(task_identity):
    """The canonical order is applied once, in FedLoraStrategy.aggregate_train: a method that
    replaced it would bypass it."""
    from fedlora.methods import get_method

    for m in ALL:
        assert get_method(m).Strategy.aggregate_train is FedLoraStrategy.aggregate_train, m
