"""Differential privacy (issue 15): clipping, noise, adaptive clipping, accounting and budget, and
their composition with every codec, every update-sending method and tiers.

The client half is driven exactly as the ClientApp drives it (``privatize`` on a ClientResult,
then the encode of the ``codec-up`` the server asked for); the server half through
``configure_train`` / ``aggregate_train`` with Flower messages. The server's noise generator is
seeded here (``ServerPrivacy.for_strategy(..., seed=)``) so the statistics are reproducible."""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, LaplaceDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedlora import privacy
from fedlora.adapters import rank_mask
from fedlora.config import RunConfig
from fedlora.privacy import (PrivacyBudgetError, ServerPrivacy, adaptive_clip, clip,
                             noisy_unclipped_fraction, privatize)
from fedlora.methods import get_method
from fedlora.strategies.base import (ADAPTER_KEY, CONFIG_KEY, METRICS_KEY, ClientResult,
                                     arrays_to_state, state_to_arrays)
from fedlora.strategies.protocol import DP_CLIPPED, DPInstruction, TrainInstruction, TrainReply
from fedlora.compression import parse_spec
from fedlora.wire import decode_record, encode_record

from conftest import FakeGrid, InProcessGrid

R, D = 8, 24
SHAPES = OrderedDict()
for _m in ("m0", "m1"):
    SHAPES[f"{_m}.lora_A.weight"] = (R, D)
    SHAPES[f"{_m}.lora_B.weight"] = (D, R)
SHAPES["fc.bias"] = (D,)

UPDATE_METHODS = ["flocora", "fedavg", "fl-lora", "ffa-lora", "flasc", "lora-a2"]
CODECS = ["fp32", "fp16", "affine:4", "affine:4|zstd", "topk:0.1|affine:4|zstd"]
DP_OFF_GUARD = {"norm_bound_factor": 0.0}
DELTA = 1e-5


def toy(seed, scale=1.0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return OrderedDict((k, (scale * rng.standard_normal(s)).astype(np.float32))
                       for k, s in shapes.items())


def make(method="flocora", seed=0, shapes=SHAPES, **kw):
    """A strategy with DP on (central, C=1, z=1 unless overridden), seeded server noise."""
    kw = {"min_train_nodes": 1, "min_available_nodes": 1, "fraction_train": 1.0,
          "lora_rank": R, "dp": "central", "dp_clip": 1.0, "dp_noise_multiplier": 1.0,
          "dp_delta": DELTA, **DP_OFF_GUARD, **kw}
    if method in ("flocora", "fedavg", "fl-lora", "ffa-lora"):
        kw.setdefault("upload", "delta")
    if method == "flasc":
        kw.setdefault("server_opt", "avg")  # the server applies the mean update as it is
    st = get_method(method).Strategy(RunConfig(method=method, **kw), shapes)
    st.privacy = ServerPrivacy.for_strategy(st, seed=seed)
    return st


def configure(st, rnd, state, nodes, grid=None):
    return list(st.configure_train(rnd, state_to_arrays(state), ConfigRecord(),
                                   grid or FakeGrid(list(nodes))))


def node_reply(msg, delta, n=10, rng=None):
    """What the ClientApp sends for a trained update ``delta`` (restricted to what the method
    uploads): DP step, then the codec the server asked for."""
    ins = TrainInstruction.from_config(msg.content[CONFIG_KEY])
    res = ClientResult(OrderedDict(delta), TrainReply(
        n, {"train-loss": 0.5}, params_up=float(sum(v.size for v in delta.values()))))
    res = privatize(res, ins, parse_spec(ins.codec_up), rng)
    record = encode_record(res.upload, ins.codec_up)
    return Message(RecordDict({ADAPTER_KEY: record, METRICS_KEY: res.reply.to_record()}),
                   reply_to=msg)


def uploaded(st, rnd, seed, scale=1.0):
    """A node's update; LoRA-A2: one rank slice per module (within any rank budget)."""
    one = st.name == "lora-a2"
    return OrderedDict((k, np.where(rank_mask(k, v.shape, [0]), v, np.float32(0))
                        if one and ".lora_" in k else v)
                       for k, v in toy(seed, scale).items() if k in st.upload_shapes(rnd))


def l2(t):
    return math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in t.values()))


def moved(new, old):
    return OrderedDict((k, new[k].astype(np.float64) - old[k]) for k in old)


# ------------------------------------------------------------------------- 1. clipping
@pytest.mark.parametrize("order", [2, 1])
def test_clipping_bounds_every_update_norm_exactly(order):
    """Over the bound: scaled to norm C (to float32 precision, never above); under it: the very
    same values. L2 for Gaussian noise, L1 for Laplace."""
    norm = (lambda t: l2(t)) if order == 2 else (
        lambda t: sum(float(np.abs(v.astype(np.float64)).sum()) for v in t.values()))
    for seed, scale in [(0, 1e-4), (1, 0.05), (2, 1.0), (3, 1e3), (4, 1e30)]:
        t = toy(seed, scale)
        for bound in (1e-3, 0.7, 5.0):
            out, before, was = clip(t, bound, order)
            after = norm(out)
            assert after <= bound
            assert math.isclose(before, norm(t), rel_tol=1e-12)
            if before > bound:
                assert was and after == pytest.approx(bound, rel=1e-6)
                ratio = [out[k].astype(np.float64) / t[k] for k in t]  # same direction
                assert all(np.allclose(r, bound / before, rtol=1e-5) for r in ratio)
            else:
                assert not was and all(np.array_equal(out[k], t[k]) for k in t)
    zero = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    out, n, was = clip(zero, 1.0)
    assert n == 0.0 and not was and l2(out) == 0.0


def test_client_step_clips_what_it_uploads_and_marks_it():
    """Central DP on the node: the upload (exactly the tensors sent) has norm <= C and says
    whether it was clipped; the other metrics stay; without dp the result is untouched."""
    big = ClientResult(toy(1, 10.0), TrainReply(7, {"train-loss": 0.3}))
    conf = TrainInstruction(upload="delta", dp=DPInstruction("central", "gaussian", 2.0, 1.0))
    out = privatize(big, conf)
    assert l2(out.upload) == pytest.approx(2.0, rel=1e-6) and l2(out.upload) <= 2.0
    assert out.metrics == {"train-loss": 0.3} and out.reply.dp_clipped == 1.0
    assert out.num_examples == 7 and list(out.upload) == list(big.upload)
    small = privatize(ClientResult(toy(1, 1e-3), TrainReply(7)), conf)
    assert small.reply.dp_clipped == 0.0
    assert privatize(big, TrainInstruction()) is big
    with pytest.raises(ValueError, match="upload='delta'"):
        privatize(big, dataclasses.replace(conf, upload="weights"))


# ------------------------------------------------------------------------- 2. noise
def _sd_tolerance(n):
    """5 standard errors of a sample standard deviation over n normal draws (≈ 1/√(2n))."""
    return 5.0 / math.sqrt(2.0 * n)


def test_server_noise_has_the_stated_standard_deviation(task_identity):
    """Central DP: four nodes upload updates of norm 3 (clipped to C=0.5) — the new global minus
    the old equals Σ clipped / m plus noise whose per-coordinate standard deviation is z·C/m
    (m = 4 sampled), mean 0. Tolerances: 5 standard errors for n coordinates."""
    shapes = OrderedDict([("m.lora_A.weight", (64, 256)), ("m.lora_B.weight", (256, 64)),
                          ("fc.bias", (10,))])
    z, c, m = 1.3, 0.5, 4
    st = make("flocora", shapes=shapes, dp_noise_multiplier=z, dp_clip=c, seed=7)
    g = toy(0, shapes=shapes)
    msgs = configure(st, 1, g, range(1, m + 1))
    ups = [toy(10 + i, shapes=shapes) for i in range(m)]
    ups = [OrderedDict((k, v * np.float32(3.0 / l2(u))) for k, v in u.items()) for u in ups]
    arrays, _ = st.aggregate_train(1, [node_reply(msg, u) for msg, u in zip(msgs, ups)])
    signal = OrderedDict((k, sum(clip(u, c)[0][k].astype(np.float64) for u in ups) / m)
                         for k in shapes)
    d = moved(arrays_to_state(arrays), g)
    noise = np.concatenate([(d[k] - signal[k]).ravel() for k in shapes])
    n = noise.size
    want = z * c / m
    assert abs(noise.std() / want - 1) < _sd_tolerance(n)
    assert abs(noise.mean()) < 5 * want / math.sqrt(n)
    rec = st.round_record(1)
    assert rec["dp_clip"] == c and rec["dp_denominator"] == m and rec["dp_clipped"] == m
    assert rec["dp_server_clipped"] == 0 and rec["dp_noise_multiplier"] == z
    # the same run without noise lands exactly on the clipped mean
    st0 = make("flocora", shapes=shapes, dp_noise_multiplier=0.0, dp_clip=c)
    msgs = configure(st0, 1, g, range(1, m + 1))
    arrays0, _ = st0.aggregate_train(1, [node_reply(msg, u) for msg, u in zip(msgs, ups)])
    d0 = moved(arrays_to_state(arrays0), g)
    for k in shapes:
        np.testing.assert_allclose(d0[k], signal[k], rtol=1e-5, atol=2e-6)  # float32 global
    assert st0.round_record(1)["dp_epsilon"] == math.inf


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_local_noise_has_the_stated_scale(mechanism):
    """Local DP: a node's upload is its clipped update plus noise of std z·2C (Gaussian) or
    Laplace scale b = z·2C (std √2·b); it sends num-examples 1 and no loss."""
    z, c = 0.8, 0.25
    upd = toy(3, 1e-3)  # norm well under C: not clipped, so upload − update is the noise
    conf = TrainInstruction(upload="delta", dp=DPInstruction("local", mechanism, c, z))
    fp32 = parse_spec("fp32")
    big = OrderedDict((k, np.zeros((200, 200), np.float32)) for k in ("a", "b"))
    for tensors in (upd, big):
        res = privatize(ClientResult(tensors, TrainReply(55, {"train-loss": 0.1})), conf, fp32,
                        np.random.default_rng(11))
        assert res.num_examples == 1 and res.metrics == {}
        assert set(res.reply.scalars()) == {"params-up", "num-examples"}
    res = privatize(ClientResult(big, TrainReply(55)), conf, fp32, np.random.default_rng(11))
    noise = np.concatenate([res.upload[k].ravel().astype(np.float64) for k in big])
    scale = z * 2 * c
    want = scale if mechanism == "gaussian" else math.sqrt(2) * scale
    # Laplace: the sample sd's standard error is larger (kurtosis 6): sd·√((κ−1)/4n) = sd·√(5/4n)
    tol = _sd_tolerance(noise.size) if mechanism == "gaussian" else 5 * math.sqrt(5 / (4 * noise.size))
    assert abs(noise.std() / want - 1) < tol
    if mechanism == "laplace":  # mean absolute deviation of Laplace(0, b) is b
        assert abs(np.abs(noise).mean() / scale - 1) < 5 / math.sqrt(noise.size)


# ------------------------------------------------------------------------- 3. accounting
def test_epsilon_in_records_matches_dp_accounting(task_identity):
    """Central, 2 of 4 nodes sampled per round (q = 0.5): each round's ``dp_epsilon`` is what
    dp_accounting's RdpAccountant gives for t Poisson-subsampled Gaussian rounds; the record also
    carries q, z, δ, and the summary the final ε."""
    z = 1.1
    st = make("flocora", dp_noise_multiplier=z, fraction_train=0.5, min_train_nodes=2)
    g = toy(0)
    for rnd in (1, 2, 3):
        msgs = configure(st, rnd, g, (1, 2, 3, 4))
        assert len(msgs) == 2
        st.aggregate_train(rnd, [node_reply(m, uploaded(st, rnd, rnd + i, 0.1))
                                 for i, m in enumerate(msgs)])
        rec = st.round_record(rnd)
        acc = RdpAccountant()
        acc.compose(PoissonSampledDpEvent(0.5, GaussianDpEvent(z)), rnd)
        assert rec["dp_epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
        assert rec["dp_sample_rate"] == 0.5 and rec["dp_delta"] == DELTA and not rec["dp_stopped"]
    summary = st.privacy.summary()
    assert summary["dp_epsilon"] == pytest.approx(rec["dp_epsilon"], rel=1e-12)
    assert summary["dp_rounds_charged"] == 3


def test_local_laplace_epsilon_matches_dp_accounting(task_identity):
    """Local Laplace (LoRA-A2 / APPFL): every client is charged every round; ε is the smaller of
    the RDP bound of t Laplace releases and the pure composition t/z."""
    z = 0.5  # per-round ε = 1/z = 2
    st = make("lora-a2", dp="local", dp_mechanism="laplace", dp_noise_multiplier=z)
    g = toy(0)
    for rnd in (1, 2, 3, 4):
        msgs = configure(st, rnd, g, (1, 2, 3))
        arrays, _ = st.aggregate_train(rnd, [node_reply(m, uploaded(st, rnd, i, 0.01))
                                             for i, m in enumerate(msgs)])
        assert arrays is not None
        acc = RdpAccountant()
        acc.compose(LaplaceDpEvent(z), rnd)
        want = min(acc.get_epsilon(DELTA), rnd / z)
        assert st.round_record(rnd)["dp_epsilon"] == pytest.approx(want, rel=1e-9)
        assert st.round_record(rnd)["dp_sample_rate"] == 1.0


# ------------------------------------------------------------------------- 4. codecs, methods
@pytest.mark.parametrize("spec", CODECS)
@pytest.mark.parametrize("method", UPDATE_METHODS)
def test_dp_composes_with_every_codec_and_method(task_identity, method, spec):
    """Central DP without noise (z = 0, so the result is exact): each node clips its update to C,
    the codec compresses the clipped update (FLASC adds its top-k, LoRA-A2 its rank slices), the
    server re-clips the decoded update and applies Σ/m. The global moves by exactly that, each
    decoded upload has norm <= C, and nothing else changes (LoRA-A2's frozen factor)."""
    if method in ("flasc", "lora-a2") and spec.startswith("topk"):
        spec = spec.split("|", 1)[1]  # these methods add their own sparsifier
    kw = {"density_up": 0.1} if method == "flasc" else {}
    c, m = 0.5, 3
    st = make(method, codec_up=spec, dp_noise_multiplier=0.0, dp_clip=c, **kw)
    g = toy(0)
    msgs = configure(st, 1, g, range(1, m + 1))
    ups = [uploaded(st, 1, 10 + i, 0.3) for i in range(m)]
    replies = [node_reply(msg, u) for msg, u in zip(msgs, ups)]
    decoded = [decode_record(r.content[ADAPTER_KEY]) for r in replies]
    assert all(l2(d) <= c * 1.2 for d in decoded)  # codec error only; the server clips again
    arrays, _ = st.aggregate_train(1, replies)
    assert arrays is not None and st.round_record(1)["rejected"] == ""
    new = arrays_to_state(arrays)
    for k in g:
        want = g[k].astype(np.float64)
        if k in ups[0]:
            want = want + sum(clip(d, c)[0][k].astype(np.float64) for d in decoded) / m
        np.testing.assert_allclose(new[k], want, rtol=1e-5, atol=1e-6)
    assert l2(moved(new, g)) <= c * (1 + 1e-6)


@pytest.mark.parametrize("method", ["flocora", "flasc", "lora-a2"])
def test_local_dp_composes_with_codecs(task_identity, method):
    """Local DP: the node adds its noise before the codec; what arrives decodes, carries
    num-examples 1, and the server averages it unweighted (the codec after the noise is
    post-processing). LoRA-A2's rank slices: the noise covers every rank, so all travel."""
    spec = "affine:4|zstd"
    st = make(method, dp="local", codec_up=spec, dp_noise_multiplier=0.5, **(
        {"density_up": 0.25} if method == "flasc" else {}))
    g = toy(0)
    msgs = configure(st, 1, g, (1, 2))
    replies = [node_reply(msg, uploaded(st, 1, 20 + i, 0.01), n=100 * (i + 1),
                          rng=np.random.default_rng(i)) for i, msg in enumerate(msgs)]
    for r in replies:
        assert r.content[METRICS_KEY]["num-examples"] == 1
    arrays, metrics = st.aggregate_train(1, replies)
    assert arrays is not None and metrics["num-examples"] == 2
    if method == "lora-a2":
        got = decode_record(replies[0].content[ADAPTER_KEY])
        b = got["m0.lora_B.weight"]
        assert np.all(np.abs(b).sum(axis=0) > 0)  # every rank column travelled


def test_dp_with_tiers(task_identity):
    """Tiers give nodes different codecs (``tier-codec-up``) and FLASC densities; DP clips and
    noises whatever each tier sends: every decoded upload is within C, the server's clipped sum
    over the fixed denominator is applied."""

    class TierGrid(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            out = super().send_and_receive(messages, timeout)
            for r in out:
                r.content[METRICS_KEY]["tier"] = r.metadata.src_node_id % 3
            return out

    c = 0.4
    for method, kw in [("flocora", {"tier_codec_up": "affine:2,affine:4|zstd,fp32"}),
                       ("flasc", {"tier_density": "0.05,0.25,1", "tier_codec_up": "affine:4,fp32"}),
                       ("lora-a2", {"tier_rank": "1,2,4", "tier_codec_up": "fp16,fp32"})]:
        st = make(method, dp_noise_multiplier=0.0, dp_clip=c, **kw)
        g = toy(0)
        nodes = (3, 4, 5, 6)
        msgs = configure(st, 1, g, nodes, TierGrid(list(nodes)))
        specs = {m.metadata.dst_node_id: m.content[CONFIG_KEY]["codec-up"] for m in msgs}
        assert len(set(specs.values())) >= 2, specs
        ups = [uploaded(st, 1, 30 + i, 0.2) for i in range(len(msgs))]
        replies = [node_reply(m, u) for m, u in zip(msgs, ups)]
        decoded = [decode_record(r.content[ADAPTER_KEY]) for r in replies]
        assert all(l2(d) <= c * 1.2 for d in decoded)  # codec error; the server clips again
        arrays, _ = st.aggregate_train(1, replies)
        new = arrays_to_state(arrays)
        for k in ups[0]:
            want = g[k] + sum(clip(d, c)[0][k].astype(np.float64) for d in decoded) / len(msgs)
            np.testing.assert_allclose(new[k], want, rtol=1e-5, atol=1e-6)


def test_lora_a2_noise_covers_unselected_ranks_and_spares_the_frozen_factor(task_identity):
    """Central DP, LoRA-A2 round 1 (B trains): nodes send 1 rank column each, but the noise is on
    every coordinate of the B factors (which ranks a node picked depends on its data); A, not
    uploaded this round, is unchanged."""
    st = make("lora-a2", dp_noise_multiplier=1.0, dp_clip=0.1)
    g = toy(0)
    msgs = configure(st, 1, g, (1, 2))
    ups = []
    for i in range(2):
        u = OrderedDict((k, np.zeros(s, np.float32)) for k, s in st.upload_shapes(1).items())
        u["m0.lora_B.weight"][:, i] = 0.01
        ups.append(u)
    arrays, _ = st.aggregate_train(1, [node_reply(m, u) for m, u in zip(msgs, ups)])
    d = moved(arrays_to_state(arrays), g)
    for mod in ("m0", "m1"):
        assert np.count_nonzero(d[f"{mod}.lora_B.weight"]) == D * R
        assert np.array_equal(d[f"{mod}.lora_A.weight"], np.zeros((R, D)))


# ------------------------------------------------------------------------- 5. budget
def test_target_epsilon_sets_sigma_and_stops_before_exceeding_it(task_identity):
    """``dp-target-epsilon``: z is calibrated so that ``num-server-rounds`` rounds at the first
    round's sample rate reach the target; every recorded ε stays within it, and a round beyond
    the plan (it would exceed the budget) is not sent: no messages, ``dp_stopped`` recorded, the
    global unchanged."""
    target = 3.0
    st = make("flocora", dp_target_epsilon=target, num_server_rounds=3)
    g = toy(0)
    for rnd in (1, 2, 3):
        msgs = configure(st, rnd, g, (1, 2, 3))
        assert len(msgs) == 3 and msgs[0].content[CONFIG_KEY]["dp-noise-multiplier"] > 1
        arrays, _ = st.aggregate_train(rnd, [node_reply(m, uploaded(st, rnd, i, 0.1))
                                             for i, m in enumerate(msgs)])
        g = arrays_to_state(arrays)
        assert st.round_record(rnd)["dp_epsilon"] <= target
    z = st.privacy.noise_multiplier
    acc = RdpAccountant()
    acc.compose(GaussianDpEvent(z), 3)
    assert target * 0.99 < acc.get_epsilon(DELTA) <= target  # the budget is used, not exceeded
    assert configure(st, 4, g, (1, 2, 3)) == []
    arrays, _ = st.aggregate_train(4, [])
    assert arrays is None
    rec = st.round_record(4)
    assert rec["dp_stopped"] and "dp-target-epsilon" in rec["dp_stop_reason"]
    assert rec["dp_epsilon"] <= target and rec["clients"] == 0 and rec["bytes_down"] == 0
    assert configure(st, 5, g, (1, 2, 3)) == []  # and stays stopped
    assert st.privacy.summary()["dp_stopped"]


def test_budget_stop_when_the_sample_rate_grows(task_identity):
    """z calibrated at q = 2/4 over 3 rounds; then half the nodes leave, so q = 2/2 = 1 (no
    amplification): the round that would take ε past the target is not sent."""
    target = 4.0
    st = make("flocora", dp_target_epsilon=target, num_server_rounds=3, fraction_train=0.5,
              min_train_nodes=2)
    g = toy(0)
    sent = []
    for rnd, nodes in [(1, (1, 2, 3, 4)), (2, (1, 2)), (3, (1, 2))]:
        msgs = configure(st, rnd, g, nodes)
        sent.append(len(msgs))
        if msgs:
            st.aggregate_train(rnd, [node_reply(m, uploaded(st, rnd, i, 0.1))
                                     for i, m in enumerate(msgs)])
        assert st.round_record(rnd)["dp_epsilon"] <= target
    assert sent[0] == 2 and 0 in sent
    assert st.privacy.stopped


def test_unreachable_target_refuses_to_start(task_identity):
    """A target ε that no noise multiplier up to 1000 meets, or adaptive clipping whose count
    noise cannot fit the budget (z >= 2σ_b), raises before any message is sent."""
    st = make("flocora", dp_target_epsilon=1e-4, num_server_rounds=50)
    with pytest.raises(PrivacyBudgetError, match="needs a noise multiplier above"):
        configure(st, 1, toy(0), (1, 2, 3))
    assert st.privacy.epsilon == 0.0 and not st.round_record(1)["bytes_down"]
    st = make("flocora", dp_adaptive_clip=True, dp_noise_multiplier=1.0)
    with pytest.raises(PrivacyBudgetError, match="dp-count-stddev"):
        configure(st, 1, toy(0), (1, 2, 3))  # σ_b = 3/20: z must be < 0.3
    st = make("flocora", dp_adaptive_clip=True, dp_noise_multiplier=1.0, dp_count_stddev=2.0)
    assert len(configure(st, 1, toy(0), (1, 2, 3))) == 3


# ------------------------------------------------------------------------- 6. adaptive clipping
def test_adaptive_rule_tracks_the_target_quantile():
    """Noise-free, ten clients with update norms 1..10: from C = 0.1 or C = 100 the geometric
    rule settles C between the norms around the 0.3 / 0.5 / 0.9 quantile (Flower 1.41's sign,
    which counts *clipped* updates, would drive C to 0 from below and up without bound from
    above)."""
    norms = np.arange(1.0, 11.0)
    rng = np.random.default_rng(0)
    for gamma, lo, hi in [(0.3, 2.0, 4.0), (0.5, 4.0, 6.0), (0.9, 8.0, 10.0)]:
        for c in (0.1, 100.0):
            for _ in range(400):
                b = noisy_unclipped_fraction(list(norms > c), len(norms), 0.0, rng)
                c = adaptive_clip(c, b, gamma, 0.2)
            assert lo <= c <= hi * 1.1, (gamma, c)
    assert adaptive_clip(1.0, 1.0, 0.5, 0.2) < 1.0 < adaptive_clip(1.0, 0.0, 0.5, 0.2)


def test_adaptive_clip_travels_to_nodes_in_the_train_config(task_identity):
    """Each round's clip value is in every node's train config; after a round in which every
    node reported clipping, the next round's C is larger by exp(η(1 − γ)) (no noise)."""
    st = make("flocora", dp_adaptive_clip=True, dp_noise_multiplier=0.0, dp_clip=0.1,
              dp_clip_lr=0.2, dp_target_quantile=0.5)
    g = toy(0)
    cs = []
    for rnd in (1, 2, 3):
        msgs = configure(st, rnd, g, (1, 2, 3))
        cs.append({m.content[CONFIG_KEY]["dp-clip"] for m in msgs})
        arrays, _ = st.aggregate_train(rnd, [node_reply(m, uploaded(st, rnd, i, 1.0))
                                             for i, m in enumerate(msgs)])
        g = arrays_to_state(arrays)
        assert st.round_record(rnd)["dp_unclipped_fraction"] == pytest.approx(0.0)
    assert all(len(c) == 1 for c in cs)
    c1, c2, c3 = (c.pop() for c in cs)
    assert c1 == 0.1
    assert c2 == pytest.approx(0.1 * math.exp(0.2 * 0.5)) and c3 == pytest.approx(c2 * math.exp(0.1))


# ------------------------------------------------------------------------- 7. settings, state
def test_settings_are_checked_at_start():
    """DP needs updates, a plain mean, and (central) no data-dependent guard bound; Laplace is
    local; the defaults leave DP off and every hook inert."""
    def build(method="flocora", **kw):
        return get_method(method).Strategy(RunConfig(method=method, **kw), SHAPES)

    with pytest.raises(ValueError, match="upload='delta'"):
        build(dp="central", norm_bound_factor=0.0)
    for method in ("flexlora", "hetlora"):
        with pytest.raises(ValueError, match="adds up updates"):
            build(method, dp="central", norm_bound_factor=0.0)
    with pytest.raises(ValueError, match="norm-bound-factor=0"):
        build(dp="central", upload="delta")
    with pytest.raises(ValueError, match="aggregation='mean'"):
        build(dp="local", upload="delta", aggregation="median")
    with pytest.raises(ValueError, match="local DP"):
        build(dp="central", dp_mechanism="laplace", upload="delta", norm_bound_factor=0.0)
    with pytest.raises(ValueError, match="needs dp='central'"):
        build(dp="local", dp_adaptive_clip=True, upload="delta")
    for bad in ({"dp": "on"}, {"dp": "central", "dp_clip": 0.0}, {"dp": "local", "dp_delta": 1.0},
                {"dp": "local", "dp_noise_multiplier": -1.0}):
        with pytest.raises(ValueError, match="run-config 'dp"):
            build(**{"upload": "delta", "norm_bound_factor": 0.0, **bad})
    st = build()  # defaults: off
    assert not st.privacy.enabled and st.privacy.record(1) == {} and st.privacy.summary() == {}
    assert st.privacy.server_step(1, ["x"]) == ["x"]
    assert build("flasc", dp="local").privacy.enabled  # FLASC/LoRA-A2 always send updates


def test_dp_off_changes_nothing_in_messages_and_records(task_identity):
    st = get_method("flocora").Strategy(RunConfig(min_train_nodes=1, min_available_nodes=1,
                                                  fraction_train=1.0), SHAPES)
    msgs = configure(st, 1, toy(0), (1, 2))
    assert not any(k.startswith("dp") for k in msgs[0].content[CONFIG_KEY].keys())
    assert not any(k.startswith("dp") for k in st.round_record(1))


def test_state_dict_round_trip_resumes_clip_accountant_and_noise(task_identity):
    """``state_dict`` → ``load_state_dict`` on a fresh object: same ε, clip, noise multiplier and
    the same next noise draws (a resumed run continues the accountant, it does not restart it)."""
    st = make("flocora", dp_adaptive_clip=True, dp_noise_multiplier=0.2, dp_count_stddev=1.0)
    g = toy(0)
    for rnd in (1, 2):
        msgs = configure(st, rnd, g, (1, 2, 3))
        arrays, _ = st.aggregate_train(rnd, [node_reply(m, uploaded(st, rnd, i, 1.0))
                                             for i, m in enumerate(msgs)])
        g = arrays_to_state(arrays)
    state = st.privacy.state_dict()
    fresh = make("flocora", dp_adaptive_clip=True, dp_noise_multiplier=0.2, dp_count_stddev=1.0,
                 seed=999).privacy
    fresh.load_state_dict(state)
    assert fresh.epsilon == st.privacy.epsilon > 0
    assert fresh.clip_norm == st.privacy.clip_norm != 1.0
    assert fresh.noise_multiplier == st.privacy.noise_multiplier
    assert np.array_equal(fresh.rng.normal(size=5), st.privacy.rng.normal(size=5))


# ------------------------------------------------------------------------- 8. hostile nodes
def test_node_that_skips_clipping_or_lies_is_bounded(task_identity):
    """A node that uploads a 1e30 update and claims ``dp-clipped`` = 1e9 does not move the global
    further than its clipped share C/m; nothing raises; the server records that it re-clipped."""
    c, m = 0.5, 3
    st = make("flocora", dp_noise_multiplier=0.0, dp_clip=c)
    g = toy(0)
    msgs = configure(st, 1, g, range(1, m + 1))
    honest = [uploaded(st, 1, i, 1e-4) for i in range(2)]
    replies = [node_reply(msg, u) for msg, u in zip(msgs, honest)]
    bad = OrderedDict((k, np.full(s, 1e30, np.float32)) for k, s in st.upload_shapes(1).items())
    replies.append(Message(RecordDict({
        ADAPTER_KEY: encode_record(bad, msgs[2].content[CONFIG_KEY]["codec-up"]),
        METRICS_KEY: MetricRecord({"num-examples": 10, DP_CLIPPED: 1e9})}),
        reply_to=msgs[2]))
    arrays, _ = st.aggregate_train(1, replies)
    rec = st.round_record(1)
    assert rec["dropped"] == 0 and rec["rejected"] == "" and rec["dp_server_clipped"] == 1
    assert l2(moved(arrays_to_state(arrays), g)) <= (c + sum(l2(u) for u in honest)) / m * 1.0001


# ------------------------------------------------------------------------- 9. end to end
@pytest.mark.parametrize("extra", [
    {"method": "flocora", "upload": "delta", "dp": "central", "dp-target-epsilon": 6.0,
     "norm-bound-factor": 0.0, "codec-up": "affine:4|zstd"},
    {"method": "lora-a2", "dp": "local", "dp-mechanism": "laplace", "dp-noise-multiplier": 0.5,
     "rank-budget": 1},
])
def test_real_server_and_client_apps_record_epsilon(tmp_path, sample_dir, task_identity, extra):
    """The ServerApp ``run`` with the real ClientApp ``train`` (tiny model, 3 nodes, 2 of 3
    sampled, 2 rounds): nodes clip (and report it) or add their noise, every round record carries
    ``dp_epsilon`` = the accountant's value, and the run finishes."""
    from fedlora.results import read_rounds
    from fedlora.server_app import run

    rc = {"num-server-rounds": 2, "feature-maps": 8, "lora-rank": 4, "local-epochs": 1,
          "max-examples-per-client": 32, "batch-size": 16, "eval-max-examples": 64,
          "fraction-train": 0.67, "min-train-nodes": 2, "min-available-nodes": 3,
          "dataset": "npz", "partitioner": "iid", "client-threads": 1, "device": "cpu",
          "data-dir": sample_dir, "run-dir": str(tmp_path), "run-name": "dp", **extra}
    summary = run(InProcessGrid(rc), RunConfig.from_run_config(rc))
    assert summary["rounds"] == 2
    recs = [r for r in read_rounds(tmp_path / "dp") if r["round"] >= 1]
    assert [r["clients"] for r in recs] == [2, 2]
    local = extra["dp"] == "local"
    z = recs[0]["dp_noise_multiplier"]
    for t, r in enumerate(recs, 1):
        acc = RdpAccountant()
        if local:
            acc.compose(LaplaceDpEvent(z), t)
            want = min(acc.get_epsilon(DELTA), t / z)
        else:
            acc.compose(PoissonSampledDpEvent(2 / 3, GaussianDpEvent(z)), t)
            want = acc.get_epsilon(DELTA)
        assert r["dp_epsilon"] == pytest.approx(want, rel=1e-9)
        if local:
            assert r["train_metrics"]["num-examples"] == 2  # nodes report 1 example each
        else:
            assert DP_CLIPPED in r["train_metrics"] and r["dp_denominator"] == 2
    if not local:
        assert recs[-1]["dp_epsilon"] <= 6.0
