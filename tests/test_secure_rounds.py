"""Secure aggregation inside fedlora's real ServerApp and ClientApp functions (an in-process grid
that delivers every message, the ``query.secagg`` ones included): the global model after a round
with secure aggregation equals the one without, up to quantization; the round's records carry
the protocol's bytes; configs the protocol cannot serve are refused before anything runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.checkpoint import latest
from fedlora.config import RunConfig
from fedlora.validate import ConfigError, check

from conftest import InProcessGrid

BASE = {"num-server-rounds": 1, "feature-maps": 8, "lora-rank": 4, "local-epochs": 1,
        "max-examples-per-client": 32, "batch-size": 16, "eval-max-examples": 32,
        "fraction-train": 1.0, "min-train-nodes": 3, "min-available-nodes": 3,
        "dataset": "npz", "partitioner": "iid", "client-threads": 1, "device": "cpu",
        "upload": "delta", "update-norm-bound": 4.0, "norm-bound-factor": 0.0}


def _run(tmp_path, sample_dir, name, **extra):
    from fedlora.results import read_rounds
    from fedlora.server_app import run

    rc = {**BASE, "data-dir": sample_dir, "run-dir": str(tmp_path), "run-name": name, **extra}
    run(InProcessGrid(rc), RunConfig.from_run_config(rc))
    state = latest(tmp_path / name).state()["global"]
    return state, [r for r in read_rounds(tmp_path / name) if r["round"] >= 1]


@pytest.mark.parametrize("method", ["flocora", "lora-a2"])
def test_secure_round_matches_the_plain_round(tmp_path, sample_dir, task_identity, method):
    """One round of 3 nodes (equal partitions, so the weighted mean is the unweighted one):
    the global after secure aggregation is the plain run's global up to the 22-bit quantization
    on the scale of update-norm-bound (per coordinate at most C/(2^21 − 1) per node); the record
    shows the protocol ran (3 survivors, bytes counted, the k-bit payload)."""
    extra = {"method": method}
    if method == "lora-a2":
        extra = {"method": method, "upload": "weights", "rank-budget": 1}
    plain, _ = _run(tmp_path, sample_dir, "plain", **extra)
    secure, recs = _run(tmp_path, sample_dir, "secure", **extra, **{
        "secure-aggregation": True, "secagg-bits": 22})
    res = 4.0 / (2 ** 21 - 1)
    worst = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
    moved = max(float(np.abs(plain[k]).max()) for k in plain)
    assert worst <= 2 * res, worst
    assert moved > 100 * res  # the round really moved the model
    r = recs[0]
    assert r["secagg_survivors"] == 3 and r["secagg_recovered"] and r["rejected"] == ""
    assert r["secagg_bytes_down"] > 0 and r["secagg_bytes_up"] > 0
    k = 22 + 2 + 1
    assert r["secagg_ring_bits"] == k
    assert r["payload_up"] == 3 * ((r["secagg_coordinates"] * k + 7) // 8)


def test_weighted_secure_round_matches_the_plain_weighted_round(tmp_path, sample_dir,
                                                               task_identity):
    """Unequal partitions (Dirichlet α = 0.3, up to 400 examples a node, no ratio cap): the plain
    flocora round takes the num-examples-weighted mean, and so does the secure one (weights
    capped at W = max-examples-per-client, the weight sum unmasked as one extra coordinate):
    both globals agree within the weighted rounding bound n·W/(s·Σw) plus float32 rounding,
    while the same secure round with equal-weights is the unweighted mean and lands far outside
    that bound (so the test sees a lost weight)."""
    extra = {"method": "flocora", "partitioner": "dirichlet", "dirichlet-alpha": 0.3,
             "max-examples-per-client": 400, "max-weight-ratio": 0.0}
    plain, _ = _run(tmp_path, sample_dir, "plain", **extra)
    secure, recs = _run(tmp_path, sample_dir, "secure", **extra, **{
        "secure-aggregation": True, "secagg-bits": 22})
    r = recs[0]
    wsum = r["secagg_weight_sum"]
    assert r["secagg_weight_cap"] == 400 and r["secagg_survivors"] == 3
    assert 3 <= wsum < 3 * 400, wsum  # unequal: some node under the cap
    bound = 3 * 400 * 4.0 / ((2 ** 21 - 1) * wsum) + 1e-6
    worst = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
    assert worst <= bound, (worst, bound)
    equal, recs = _run(tmp_path, sample_dir, "equal", **extra, **{
        "secure-aggregation": True, "secagg-bits": 22, "equal-weights": True})
    assert recs[0]["secagg_weight_cap"] == 0 and recs[0]["secagg_weight_sum"] == 3
    assert max(float(np.abs(plain[k] - equal[k]).max()) for k in plain) > 10 * bound


def test_lora_a2_rank_union_round_matches_the_plain_round(tmp_path, sample_dir, task_identity):
    """lora-a2 with secagg-rank-union (rank 4, budget 1, 3 nodes): the first secure sum counts
    the selected slices, only their union is masked in the second session, and the global equals
    the plain round's up to 2 grid steps; the union is at most 3 of the 4 slices of each module,
    so the values upload is smaller than the dense one (the same round without the union)."""
    extra = {"method": "lora-a2", "upload": "weights", "rank-budget": 1, "lora-rank": 4}
    plain, _ = _run(tmp_path, sample_dir, "plain", **extra)
    sec = {"secure-aggregation": True, "secagg-bits": 22}
    union, recs = _run(tmp_path, sample_dir, "union", **extra, **sec, **{
        "secagg-rank-union": True})
    _, dense = _run(tmp_path, sample_dir, "dense", **extra, **sec)
    r = recs[0]
    assert r["rejected"] == "" and r["secagg_survivors"] == 3, r
    modules = r["secagg_slices"] // 4
    assert 1 <= r["secagg_union_slices"] <= 3 * modules
    assert r["secagg_values_coordinates"] < dense[0]["secagg_coordinates"] - 1
    worst = max(float(np.abs(plain[k] - union[k]).max()) for k in plain)
    assert worst <= 2 * 4.0 / (2 ** 21 - 1), worst
    assert r["payload_up"] < dense[0]["payload_up"]


def test_flasc_secure_round_is_the_plain_unweighted_round(tmp_path, sample_dir, task_identity):
    """FLASC at density-up 1 (its upload dense; a sparse round would be secagg-density's shared
    set): the secure round is unweighted as FLASC's pseudo-gradient is (no weight coordinate),
    and with server-opt=avg its global equals the plain run's up to the 22-bit grid."""
    extra = {"method": "flasc", "server-opt": "avg", "partitioner": "dirichlet",
             "max-examples-per-client": 400}
    plain, _ = _run(tmp_path, sample_dir, "plain", **extra)
    secure, recs = _run(tmp_path, sample_dir, "secure", **extra, **{
        "secure-aggregation": True, "secagg-bits": 22})
    r = recs[0]
    assert r["secagg_weight_cap"] == 0 and r["secagg_weight_sum"] == 3
    worst = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
    assert worst <= 2 * 4.0 / (2 ** 21 - 1), worst
    assert max(float(np.abs(plain[k]).max()) for k in plain) > 0


def test_distributed_noise_is_accounted(tmp_path, sample_dir, task_identity):
    """secagg-noise > 0 with secagg-density 0.5: every round record carries dp_epsilon from the
    accountant (Gaussian RDP at multiplier z·√(survivors/n), q = 1), the ring is widened for the
    noise, and half the coordinates travel (k bits each)."""
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    state, recs = _run(tmp_path, sample_dir, "noisy", method="flocora", **{
        "secure-aggregation": True, "secagg-noise": 1.0, "num-server-rounds": 2,
        "secagg-density": 0.5})
    total = sum(v.size for v in state.values())
    for t, r in enumerate(recs, 1):
        # half the coordinates, one set for all nodes; the ring has room for the noise
        assert r["secagg_coordinates"] == math.ceil(0.5 * total)
        assert r["secagg_ring_bits"] == 16 + math.ceil(math.log2(3 + 10)) + 1
        assert r["payload_up"] == 3 * ((r["secagg_coordinates"] * r["secagg_ring_bits"] + 7) // 8)
        acc = RdpAccountant()
        acc.compose(GaussianDpEvent(1.0), t)
        assert r["dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize("bad,why", [
    ({"method": "flasc", "density-up": 0.1}, "density-up=1"),
    ({"method": "flexlora", "upload": "weights"}, "sum of the"),
    ({"max-examples-per-client": 40000}, "max-examples-per-client"),
    ({"secagg-rank-union": True}, "secagg-rank-union"),
    ({"method": "hetlora", "upload": "weights"}, "sum of the"),
    ({"upload": "weights"}, "upload='delta'"),
    ({"update-norm-bound": 0.0}, "update-norm-bound"),
    ({"dp": "central"}, "dp"),
    ({"codec-up": "affine:4"}, "codec"),
    ({"aggregation": "median"}, "mean"),
    ({"secagg-neighbours": 3}, "even"),
    ({"secagg-threshold": 0.4}, "secagg-threshold"),
    ({"secagg-bits": 40}, "secagg-bits"),
])
def test_refused_configs(bad, why):
    """Configs secure aggregation cannot serve: one ConfigError naming the reason."""
    cfg = {"method": "fedavg", "upload": "delta", "update-norm-bound": 1.0,
           "secure-aggregation": True, **bad}
    with pytest.raises(ConfigError, match=why):
        check(cfg, light=True)


@pytest.mark.slow
def test_real_flower_simulation_same_model_as_without(tmp_path, sample_dir):
    """Through the real ``flwr run`` path (SuperLink, 3 simulated SuperNodes, the Message API
    grid): a round with secure aggregation ends with the plain run's global model up to
    quantization (22 bits on C = 4: two grid steps), unmasked by all 3 nodes, and no process is
    left behind. (Over several rounds the quantization difference changes what nodes train
    from, and the two runs drift apart by more than the grid.)"""
    import json

    from fedlora.launch import pids_with_env, run_simulation
    from fedlora.results import read_rounds

    out = {}
    for name, extra in (("plain", {}), ("secure", {"secure-aggregation": True,
                                                   "secagg-bits": 22})):
        work = tmp_path / name
        work.mkdir()
        rc = {**BASE, "method": "flocora", "data-dir": sample_dir,
              **extra}
        res, run_dir = run_simulation(rc, nodes=3, work_dir=work, timeout=900)
        assert res.returncode == 0, res.stdout[-4000:]
        assert not pids_with_env(str(work)), "a process of this run is still alive"
        out[name] = (latest(run_dir).state()["global"],
                     [r for r in read_rounds(run_dir) if r["round"] >= 1])
        json.loads((run_dir / "run.json").read_text())
    plain, secure = out["plain"][0], out["secure"][0]
    worst = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
    assert worst <= 2 * 4.0 / (2 ** 21 - 1), worst
    assert all(r["secagg_survivors"] == 3 and r["clients"] == 3 for r in out["secure"][1])
    assert all(r["secagg_bytes_up"] > 0 for r in out["secure"][1])


class LossyGrid(InProcessGrid):
    """The in-process grid with faults: ``corrupt_share`` nodes answer the share stage with
    garbage; ``lose_train`` nodes' train replies never arrive (lost after sharing)."""

    def __init__(self, rc, node_ids, corrupt_share=(), lose_train=()):
        super().__init__(rc, node_ids=node_ids)
        self.corrupt_share, self.lose_train = set(corrupt_share), set(lose_train)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, MessageType

        msgs = list(messages)
        out = []
        for m, reply in zip(msgs, super().send_and_receive(msgs, timeout)):
            node, kind = m.metadata.dst_node_id, m.metadata.message_type
            if kind == MessageType.TRAIN and node in self.lose_train:
                continue
            if kind.endswith(".secagg") and m.content.config_records["config"]["stage"] == \
                    "share" and node in self.corrupt_share:
                reply.content.config_records["fedlora-secagg"] = ConfigRecord(
                    {"reply": b"\x00\x00\x00\x07garbage"})
            out.append(reply)
        return out


def test_node_faults_dropped_with_reasons_and_too_many_refused(tmp_path, sample_dir,
                                                                task_identity):
    """5 nodes (complete graph, t = 3): a node whose share answer is garbage is dropped with a
    ``secagg share`` reason and left out; a node lost after sharing is recovered; the round is
    applied with the 3 others. Losing 3 after sharing leaves 2 < t: the round is refused with a
    RecoveryError (the strategy then keeps the previous global model)."""
    from fedlora.results import read_rounds
    from fedlora.server_app import run

    nodes = (101, 102, 103, 104, 105)
    rc = {**BASE, "method": "flocora", "min-train-nodes": 5, "min-available-nodes": 5,
          "secure-aggregation": True, "data-dir": sample_dir, "run-dir": str(tmp_path)}
    run(LossyGrid({**rc, "run-name": "faults"}, nodes, corrupt_share={101}, lose_train={102}),
        RunConfig.from_run_config({**rc, "run-name": "faults"}))
    r = [x for x in read_rounds(tmp_path / "faults") if x["round"] == 1][0]
    assert r["rejected"] == "" and r["clients"] == 3 and r["secagg_survivors"] == 3
    assert r["secagg_shared"] == 4 and r["secagg_dropped_after_sharing"] == 1
    assert any(d["node"] == 101 and d["reason"].startswith("secagg share: SecAggError")
               for d in r["dropped_reasons"]), r["dropped_reasons"]

    run(LossyGrid({**rc, "run-name": "lost"}, nodes, lose_train={101, 102, 103}),
        RunConfig.from_run_config({**rc, "run-name": "lost"}))
    r = [x for x in read_rounds(tmp_path / "lost") if x["round"] == 1][0]
    assert r["rejected"].startswith("RecoveryError") and "threshold t = 3" in r["rejected"]
    assert r["secagg_recovered"] is False


def test_distributed_dp_accountant_survives_a_checkpoint():
    """The strategy's checkpoint state carries the distributed-DP accountant's ledger: a fresh
    strategy loaded from it reports the same ε."""
    from collections import OrderedDict

    from fedlora.methods import get_method

    cfg = RunConfig(method="flocora", upload="delta", update_norm_bound=1.0,
                    norm_bound_factor=0.0, secure_aggregation=True, secagg_noise=1.5)
    shapes = OrderedDict([("a.lora_A.weight", (2, 3))])
    st = get_method("flocora").Strategy(cfg, shapes)
    st.secure.accountant.charge(0.5, 1.5)
    st.secure.accountant.charge(0.5, 1.5)
    again = get_method("flocora").Strategy(cfg, shapes)
    again.load_state_dict(st.state_dict())
    assert again.secure.accountant.epsilon() == st.secure.accountant.epsilon() > 0


class ValuesLossGrid(LossyGrid):
    """The in-process grid where ``lose_values`` nodes' answers to the rank union's values
    stage never arrive (lost after sharing in the second session)."""

    def __init__(self, rc, node_ids, lose_values=()):
        super().__init__(rc, node_ids)
        self.lose_values = set(lose_values)

    def send_and_receive(self, messages, timeout=None):
        msgs = list(messages)
        out = []
        for m, reply in zip(msgs, super().send_and_receive(msgs, timeout)):
            if m.metadata.message_type.endswith(".secagg") and m.metadata.dst_node_id in \
                    self.lose_values and m.content.config_records["config"]["stage"] == "values":
                continue
            out.append(reply)
        return out


def test_rank_union_node_lost_in_the_values_session_is_recovered(tmp_path, sample_dir,
                                                                   task_identity):
    """lora-a2 with secagg-rank-union on 5 nodes: a node whose values answer is lost (after
    it sent its indicators and shared its second-session keys) is recovered by the second
    session's unmask: the round is applied with the 4 others."""
    from fedlora.results import read_rounds
    from fedlora.server_app import run

    nodes = (101, 102, 103, 104, 105)
    rc = {**BASE, "method": "lora-a2", "upload": "weights", "rank-budget": 1,
          "min-train-nodes": 5, "min-available-nodes": 5, "secure-aggregation": True,
          "secagg-rank-union": True, "data-dir": sample_dir, "run-dir": str(tmp_path),
          "run-name": "lost"}
    run(ValuesLossGrid(rc, nodes, lose_values={102}), RunConfig.from_run_config(rc))
    r = [x for x in read_rounds(tmp_path / "lost") if x["round"] == 1][0]
    assert r["rejected"] == "" and r["clients"] == 4 and r["secagg_survivors"] == 4, r
    assert r["secagg_dropped_after_sharing"] == 1 and r["secagg_recovered"]
