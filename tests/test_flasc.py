"""FLASC's server half on toy tensors: sparse aggregation = the dense computation on the union
support, the AdamW step = torch's, bytes scale with density (measured), tiers get their own
densities."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.compression import topk_mask
from fedlora.config import RunConfig
from fedlora.methods import get_method
from fedlora.strategies.base import ADAPTER_KEY, METRICS_KEY, arrays_to_state, state_to_arrays
from fedlora.wire import decode_record, encode_record

SHAPES = {"l.lora_A.weight": (16, 2000), "l.lora_B.weight": (2000, 16), "fc.weight": (10, 400),
          "fc.bias": (10,)}


class FakeGrid:
    """Nodes answer the tier query with tier = position in ``tiers``."""

    def __init__(self, tiers: dict[int, int]):
        self.tiers = tiers
        self.queries = 0

    def get_node_ids(self):
        return list(self.tiers)

    def send_and_receive(self, messages, timeout=None):
        self.queries += len(messages)
        return [Message(RecordDict({METRICS_KEY: MetricRecord(
            {"tier": self.tiers[m.metadata.dst_node_id]})}), reply_to=m) for m in messages]


def toy(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return OrderedDict((k, (scale * rng.standard_normal(s)).astype(np.float32))
                       for k, s in SHAPES.items())


def flasc(**kw):
    cfg = RunConfig(method="flasc", min_train_nodes=1, min_available_nodes=1,
                    fraction_train=1.0, **kw)
    return get_method("flasc").Strategy(cfg, SHAPES)


def round_trip(strategy, tiers, state, deltas):
    msgs = list(strategy.configure_train(1, state_to_arrays(state), ConfigRecord(),
                                         FakeGrid(tiers)))
    replies = []
    for m, d in zip(msgs, deltas):
        rec = encode_record(d, m.content["config"]["codec-up"])
        replies.append(Message(RecordDict({ADAPTER_KEY: rec, METRICS_KEY: MetricRecord(
            {"num-examples": 5})}), reply_to=m))
    arrays, _ = strategy.aggregate_train(1, replies)
    return msgs, replies, arrays_to_state(arrays)


def test_avg_step_is_torch_sgd_at_lr_1_bit_for_bit(task_identity):
    """server-opt avg applies the mean delta with numpy (torch's OpenMP kernels stall beside
    busy nodes); it is exactly torch's SGD(lr=1) step on −mean, which server-opt sgd runs."""
    state, deltas = toy(0), [toy(i, 0.1) for i in (1, 2, 3)]
    outs = [round_trip(flasc(density_up=0.1, **kw), {1: 0, 2: 0, 3: 0}, state, deltas)[2]
            for kw in ({"server_opt": "avg"}, {"server_opt": "sgd", "server_lr": 1.0})]
    for k in SHAPES:
        assert outs[0][k].tobytes() == outs[1][k].tobytes()
        assert not np.array_equal(outs[0][k], state[k])


def test_sparse_mean_equals_dense_on_union_support(task_identity):
    s = flasc(server_opt="avg", density_up=0.1)
    state, deltas = toy(0), [toy(i, 0.1) for i in (1, 2, 3)]
    _, replies, new = round_trip(s, {1: 0, 2: 0, 3: 0}, state, deltas)
    masks = [topk_mask(d, 0.1) for d in deltas]
    union = {k: np.any([m[k] for m in masks], axis=0) for k in SHAPES}
    for k in SHAPES:
        dense = sum(np.where(m[k], d[k], 0.0) for m, d in zip(masks, deltas)) / 3
        np.testing.assert_allclose(new[k], state[k] + dense, rtol=1e-5, atol=1e-6)
        assert np.array_equal(new[k] != state[k], union[k])  # moved exactly on the union
    sent = sum(int(m[k].sum()) for m in masks for k in SHAPES)
    assert sent == 3 * int(0.1 * sum(np.prod(v) for v in SHAPES.values()))


def test_server_adamw_step_matches_torch(task_identity):
    s = flasc(server_opt="adamw", server_lr=0.01, density_up=0.25)
    state, deltas = toy(0), [toy(i, 0.1) for i in (4, 5)]
    _, replies, new = round_trip(s, {1: 0, 2: 0}, state, deltas)
    got = [decode_record(r.content[ADAPTER_KEY]) for r in replies]
    for k in SHAPES:
        p = torch.nn.Parameter(torch.from_numpy(state[k].copy()))
        opt = torch.optim.AdamW([p], lr=0.01, weight_decay=0.01)
        p.grad = torch.from_numpy(-(got[0][k] + got[1][k]) / 2)
        opt.step()
        np.testing.assert_allclose(new[k], p.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_download_is_topk_by_weight_and_bytes_scale_with_density(task_identity):
    state = toy(7)
    down_bytes, up_bytes = {}, {}
    for d in (1.0, 0.25, 0.0625):
        s = flasc(density_down=d, density_up=d)
        msgs, _, _ = round_trip(s, {1: 0}, state, [toy(1, 0.1)])
        rec = s.round_record(1)
        down_bytes[d], up_bytes[d] = rec["bytes_down"], rec["bytes_up"]
        down = decode_record(msgs[0].content[ADAPTER_KEY], expected=SHAPES)
        if d < 1:
            mask = topk_mask(state, d)
            for k in SHAPES:   # exactly the largest-|weight| entries, values unchanged
                assert np.array_equal(down[k] != 0, mask[k])
                np.testing.assert_array_equal(down[k][mask[k]], state[k][mask[k]])
    for d in (0.25, 0.0625):   # measured wire bytes: values + compact indices, not dense
        for sizes in (down_bytes, up_bytes):
            ratio = sizes[d] / sizes[1.0]
            assert d < ratio < d * 1.4, (d, ratio)  # ≤ ~1.25 B of index per 4 B value


def test_tiers_get_their_own_densities(task_identity):
    s = flasc(tier_density="0.0625,0.25,1", density_down=1.0, density_up=1.0)
    grid = FakeGrid({10: 0, 11: 1, 12: 2})
    msgs = list(s.configure_train(1, state_to_arrays(toy(0)), ConfigRecord(), grid))
    by_node = {m.metadata.dst_node_id: m.content["config"] for m in msgs}
    assert by_node[10]["codec-down"] == "topk:0.0625" and by_node[10]["codec-up"] == "topk:0.0625"
    assert by_node[11]["codec-down"] == "topk:0.25"
    assert by_node[12]["codec-down"] == "fp32" and by_node[12]["tier"] == 2
    assert grid.queries == 3
    list(s.configure_train(2, state_to_arrays(toy(0)), ConfigRecord(), grid))
    assert grid.queries == 3       # tiers are asked once per node
    rec = s.round_record(1)
    assert rec["control_bytes"] > 0
    down = rec["bytes_down_per_node"]
    assert down["10"] < down["11"] < down["12"]


def test_density_decay_and_bad_settings():
    s = flasc(density_down=0.5, density_decay=0.5, density_decay_rounds=2)
    assert [s.density(0.5, r, None) for r in (1, 2, 3, 4, 5)] == [0.5, 0.5, 0.25, 0.25, 0.125]
    with pytest.raises(ValueError, match="must not sparsify"):
        flasc(codec_up="topk:0.1")
    with pytest.raises(ValueError, match="flasc-freeze"):
        flasc(flasc_freeze="sometimes")
