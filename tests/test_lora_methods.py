"""LoRA-A2 and its baselines on toy tensors and on a tiny real model."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.adapters import state_to_numpy, travelling_state
from fedlora.config import RunConfig
from fedlora.methods import get_method
from fedlora.strategies.base import (ADAPTER_KEY, METRICS_KEY, ClientRound, ClientUpdate,
                                     state_to_arrays)
from fedlora.methods.lora_a2 import rank_scores, select_ranks
from fedlora.strategies.protocol import TrainInstruction
from fedlora.tasks import make_task
from fedlora.wire import encode_record

from conftest import FakeGrid

R, D = 4, 256   # global rank, layer width (square layers: |A| = |B|)
SHAPES = OrderedDict()
for m in ("m0", "m1", "m2"):
    SHAPES[f"{m}.lora_A.weight"] = (R, D)
    SHAPES[f"{m}.lora_B.weight"] = (D, R)


def toy(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return OrderedDict((k, (scale * rng.standard_normal(s)).astype(np.float32))
                       for k, s in SHAPES.items())


def strategy(method, **kw):
    cfg = RunConfig(method=method, min_train_nodes=1, min_available_nodes=1,
                    fraction_train=1.0, lora_rank=R, **kw)
    return get_method(method).Strategy(cfg, SHAPES)


def upd(tensors, n, node=1, metrics=None):
    return ClientUpdate(node, OrderedDict(tensors), n, metrics or {})


def product(state, m):
    return state[f"{m}.lora_B.weight"].astype(np.float64) @ state[f"{m}.lora_A.weight"]


# ------------------------------------------------------------------------------- discordance
def test_alternating_rounds_have_no_discordance_fl_lora_has():
    g = toy(0)
    ns = [30, 70]
    w = np.array(ns) / sum(ns)
    a2 = strategy("lora-a2")
    # odd round: clients change B only (A frozen)
    clients_b = [OrderedDict((k, g[k] + (0.3 * toy(s)[k] if ".lora_B." in k else 0))
                             for k in g) for s in (1, 2)]
    deltas = [OrderedDict((k, c[k] - g[k]) for k in g if ".lora_B." in k) for c in clients_b]
    new = a2.aggregate_updates(1, g, [upd(d, n) for d, n in zip(deltas, ns)])
    for m in ("m0", "m1", "m2"):
        mean_of_products = sum(wi * product(c, m) for wi, c in zip(w, clients_b))
        np.testing.assert_allclose(product(new, m), mean_of_products, rtol=1e-5, atol=1e-5)
    # even round: A only
    clients_a = [OrderedDict((k, new[k] + (0.3 * toy(s)[k] if ".lora_A." in k else 0))
                             for k in new) for s in (3, 4)]
    deltas = [OrderedDict((k, c[k] - new[k]) for k in new if ".lora_A." in k) for c in clients_a]
    new2 = a2.aggregate_updates(2, new, [upd(d, n) for d, n in zip(deltas, ns)])
    for m in ("m0", "m1", "m2"):
        mean_of_products = sum(wi * product(c, m) for wi, c in zip(w, clients_a))
        np.testing.assert_allclose(product(new2, m), mean_of_products, rtol=1e-5, atol=1e-5)
    # FL+LoRA: both factors move → product of averages ≠ average of products
    both = [OrderedDict((k, g[k] + 0.3 * toy(s)[k]) for k in g) for s in (5, 6)]
    avg = strategy("fl-lora").aggregate_updates(1, g, [upd(c, n) for c, n in zip(both, ns)])
    gap = np.linalg.norm(product(avg, "m0") - sum(wi * product(c, "m0") for wi, c in zip(w, both)))
    assert gap > 1e-2


# ------------------------------------------------------------------------------- selection
def test_rank_selection_picks_constructed_top_ranks_with_a_global_budget():
    start = OrderedDict((k, np.ones(s, np.float32)) for k, s in SHAPES.items())
    delta = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    # odd round: score(m, i) = ‖ΔB[:, i]‖·‖A[i]‖; make m1 own the three best ranks, m0 one
    delta["m1.lora_B.weight"][:, [0, 2, 3]] = [5.0, 4.0, 3.0]
    delta["m0.lora_B.weight"][:, 1] = 2.0
    delta["m2.lora_B.weight"][:, 0] = 0.5
    scores = rank_scores(start, delta, server_round=1)
    chosen = select_ranks(scores, budget=1, num_modules=3)      # 1 · N = 3 ranks in total
    assert chosen == {"m1": [0, 2, 3]}                           # m0 and m2 get none
    chosen = select_ranks(scores, budget=4 // 3 + 1, num_modules=2)  # 4 ranks
    assert chosen == {"m0": [1], "m1": [0, 2, 3]}
    # even round uses ‖B[:, i]‖·‖ΔA[i]‖: a huge ΔA row with a zero B column scores 0
    start["m0.lora_B.weight"][:, 0] = 0.0
    delta = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    delta["m0.lora_A.weight"][0] = 100.0
    delta["m2.lora_A.weight"][3] = 1.0
    assert select_ranks(rank_scores(start, delta, 2), 1, 1) == {"m2": [3]}


@pytest.fixture(scope="module")
def tiny_task(sample_dir):
    cfg = RunConfig(dataset="npz", data_dir=sample_dir, feature_maps=8, lora_rank=4,
                    max_examples_per_client=64, local_epochs=2, weight_decay=0.05,
                    partitioner="iid", rank_budget=1, seed=3)
    return cfg, make_task(cfg)


def _client_round(cfg, task, rnd, received, **fields):
    return ClientRound(cfg=cfg, task=task, ins=TrainInstruction(server_round=rnd, **fields),
                       received=received, partition_id=0, num_partitions=2)


@pytest.mark.parametrize("rnd", [1, 2])
def test_unselected_entries_bit_identical_after_local_training(tiny_task, rnd):
    cfg, task = tiny_task
    model = task.new_model(True)
    with torch.no_grad():      # a non-zero B so that even rounds have gradients for A
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    start = state_to_numpy(travelling_state(model))
    seen = []
    real_train = task.train

    def spy(m, data, seed, **kw):
        out = real_train(m, data, seed, **kw)
        seen.append(state_to_numpy(travelling_state(m)))
        return out

    task.train = spy
    try:
        res = get_method("lora-a2").client_train(_client_round(cfg, task, rnd, start))
    finally:
        task.train = real_train
    trained = seen[-1]                       # after the masked local training
    other = ".lora_A." if rnd == 1 else ".lora_B."
    moved = 0
    for k, v in trained.items():
        if other in k:
            assert np.array_equal(v, start[k]), k          # frozen factor untouched
        elif ".lora_" in k:
            changed = np.any(v != start[k], axis=tuple(i for i in range(v.ndim)
                                                        if i != (0 if ".lora_A." in k else 1)))
            sent = np.any(res.upload[k] != 0, axis=tuple(i for i in range(v.ndim)
                                                         if i != (0 if ".lora_A." in k else 1)))
            assert not np.any(changed & ~sent), k            # only selected slices moved
            moved += int(changed.sum())
    n_modules = sum(1 for k in start if ".lora_A." in k)
    assert moved == int(res.reply.ranks_selected) == n_modules * cfg.rank_budget
    assert set(res.upload) == {k for k in start if other not in k}


# ------------------------------------------------------------------------------- bytes
Grid = FakeGrid  # answers query messages with tier 0 and partition-ids


def measured_upload(method, uploads_for, rnd=1, **kw):
    s = strategy(method, **kw)
    msgs = list(s.configure_train(rnd, state_to_arrays(toy(0)), ConfigRecord(), Grid([1])))
    up = uploads_for(msgs[0].content["config"])
    rec = encode_record(up, msgs[0].content["config"]["codec-up"])
    reply = Message(RecordDict({ADAPTER_KEY: rec, METRICS_KEY: MetricRecord(
        {"num-examples": 4})}), reply_to=msgs[0])
    s.aggregate_train(rnd, [reply])
    assert s.round_record(rnd)["dropped"] == 0
    return s.round_record(rnd)["payload_up"], s.round_record(rnd)["bytes_up"]


def test_lora_a2_upload_bytes_proportional_to_selected_ranks(task_identity):
    def masked_b(n_ranks):
        def make(cfg):
            out = OrderedDict()
            for k, v in toy(9).items():
                if ".lora_B." in k:
                    v = v.copy()
                    v[:, n_ranks:] = 0.0
                    out[k] = v
            return out
        return make

    sizes = {n: measured_upload("lora-a2", masked_b(n), rank_budget=4) for n in (1, 2, 4)}
    per_rank = sizes[2][0] - sizes[1][0]
    assert per_rank > 0
    assert sizes[4][0] - sizes[2][0] == pytest.approx(2 * per_rank, rel=0.02)
    assert per_rank >= 3 * D * 4                       # 3 modules × D floats per rank
    assert sizes[4][1] / sizes[1][1] > 3.0            # measured wire bytes follow


def test_ffa_lora_sends_half_of_fl_lora(task_identity):
    full, _ = measured_upload("fl-lora", lambda cfg: toy(2))
    half, _ = measured_upload("ffa-lora", lambda cfg: OrderedDict(
        (k, v) for k, v in toy(2).items() if ".lora_A." not in k))
    assert half / full == pytest.approx(0.5, abs=0.02)


# ------------------------------------------------------------------------------- FlexLoRA
def test_flexlora_svd_is_the_best_rank_r_fit_and_survives_bad_input():
    s = strategy("flexlora")
    g = toy(0)
    ups = [upd(toy(1), 1), upd(toy(2), 3)]
    new = s.aggregate_updates(1, g, ups)
    for m in ("m0", "m1", "m2"):
        target = 0.25 * product(ups[0].tensors, m) + 0.75 * product(ups[1].tensors, m)
        u, sv, vt = np.linalg.svd(target)
        best = (u[:, :R] * sv[:R]) @ vt[:R]
        np.testing.assert_allclose(product(new, m), best, rtol=1e-4, atol=1e-4)
    bad = toy(3)
    bad["m1.lora_B.weight"][0, 0] = np.inf           # an ill-conditioned ΔW for m1
    new = s.aggregate_updates(2, g, [upd(bad, 1)])
    np.testing.assert_array_equal(new["m1.lora_A.weight"], g["m1.lora_A.weight"])
    assert s.svd_failures == 1 and np.all(np.isfinite(new["m0.lora_A.weight"]))


def test_flexlora_and_hetlora_truncate_per_client_rank(task_identity):
    for method in ("flexlora", "hetlora"):
        s = strategy(method, tier_rank="1,3")

        class TierGrid(Grid):
            def send_and_receive(self, messages, timeout=None):
                return [Message(RecordDict({METRICS_KEY: MetricRecord(
                    {"tier": m.metadata.dst_node_id - 1})}), reply_to=m) for m in messages]

        msgs = list(s.configure_train(1, state_to_arrays(toy(0)), ConfigRecord(),
                                      TierGrid([1, 2])))
        from fedlora.wire import decode_record
        for m in msgs:
            rank = m.content["config"]["rank-budget"]
            down = decode_record(m.content[ADAPTER_KEY], expected=SHAPES)
            assert rank == {1: 1, 2: 3}[m.metadata.dst_node_id]
            assert np.all(down["m0.lora_A.weight"][rank:] == 0)
            assert np.all(down["m0.lora_A.weight"][:rank] != 0)


def test_hetlora_zero_padding_mean_and_self_pruning_report():
    s = strategy("hetlora", rank_budget=4)
    a, b = toy(1), toy(2)
    for k in b:
        if ".lora_A." in k:
            b[k][2:] = 0
        else:
            b[k][:, 2:] = 0
    new = s.aggregate_updates(1, toy(0), [upd(a, 1, node=7), upd(b, 1, node=8,
                                                                  metrics={"rank": 2.0})])
    np.testing.assert_allclose(new["m0.lora_A.weight"][3], 0.5 * a["m0.lora_A.weight"][3])
    assert s.client_rank(8) == 2 and s.client_rank(7) == 4
