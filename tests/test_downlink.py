"""Compressed downloads: per-node delta downloads with server-side error feedback.

What is proved here: (1) the server's record of a node plus what it still owes equals the global,
and a lossy delta codec does not let the error accumulate (a naive delta chain does); (2) a node
that applies a delta to the copy it holds ends bit for bit at the server's record of it, lossy
codecs included; (3) a node without state, or with a stale/unknown copy, is detected and served
in full; (4) through the strategy: replies commit records, failures forget them; LoRA-A2's delta
carries only changed rank slices.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedlora.compression import decode_payload, parse_spec
from fedlora.config import RunConfig
from fedlora.methods import get_method
from fedlora.strategies.base import ADAPTER_KEY, CONFIG_KEY, METRICS_KEY, state_to_arrays
from fedlora.strategies.protocol import DownInstruction
from fedlora.strategies.downlink import (Copy, Downlink, StaleDownload, apply_delta,
                                         client_apply, digest)
from fedlora.wire import decode_record, encode_record

from conftest import FakeGrid

SHAPES = {"m.lora_A.weight": (16, 24), "m.lora_B.weight": (32, 16), "fc.bias": (32,)}
LOSSY = ["affine:4", "topk:0.1|affine:4|zstd", "affine:2", "fp16", "sign", "lowrank:2|affine:4"]
# a codec for updates only needs a weight codec for full downloads
FULL = {"sign": "affine:8", "lowrank:2|affine:4": "affine:8"}


def toy(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return OrderedDict((k, (scale * rng.standard_normal(s)).astype(np.float32))
                       for k, s in SHAPES.items())


def node_side(dl, held):
    """What the ClientApp does with one download; returns (state, copy)."""
    conf = DownInstruction(dl.mode, dl.base, dl.result.digest)
    decoded = decode_payload(dl.payload, expected=SHAPES)
    return client_apply(decoded, conf, held)


@pytest.mark.parametrize("spec", LOSSY)
def test_node_ends_exactly_at_server_record_and_error_does_not_accumulate(spec):
    link = Downlink("delta", FULL.get(spec, ""))
    pipe = parse_spec(spec)
    targets = [toy(0)]
    for t in range(1, 30):  # a global that keeps moving, as training does
        targets.append(OrderedDict((k, v + 0.05 * toy(100 + t)[k]) for k, v in targets[-1].items()))
    held = None
    naive = None  # the same deltas without the server's record: C(x_t - x_{t-1}) accumulated
    errs, naive_errs = [], []
    for rnd, target in enumerate(targets, 1):
        dl = link.prepare(rnd, 7, target, pipe)
        assert dl.mode == ("full" if rnd == 1 else "delta")
        state, held = node_side(dl, held)
        # the node's model is bit for bit the server's record of it
        for k in SHAPES:
            assert np.array_equal(state[k], dl.result.state[k])
        assert held.digest == dl.result.digest
        link.settle(rnd, {7})
        # record + residual = global (up to one float32 rounding of the subtraction)
        res = link.residual(7, target)
        for k in SHAPES:
            np.testing.assert_allclose(link.held[7].state[k] + res[k], target[k], rtol=0,
                                       atol=1e-6 * float(np.abs(target[k]).max()))
        errs.append(max(float(np.abs(res[k]).max()) for k in SHAPES))
        if rnd == 1:
            naive = OrderedDict((k, v.copy()) for k, v in state.items())
        else:
            step = OrderedDict((k, target[k] - targets[rnd - 2][k]) for k in SHAPES)
            got = decode_payload(pipe.encode(step), expected=SHAPES)
            naive = apply_delta(naive, got)
        naive_errs.append(max(float(np.abs(target[k] - naive[k]).max()) for k in SHAPES))
    # with the record the error stays at one step's codec error; without, it drifts
    assert max(errs[-10:]) <= 1.5 * max(errs[1:10]) + 1e-6
    if spec != "fp16":
        assert naive_errs[-1] > 2 * errs[-1]


def test_delta_is_exact_with_fp32_and_empty_when_nothing_changed():
    link = Downlink("delta", full_spec="fp32")
    x = toy(1)
    dl1 = link.prepare(1, 3, x, parse_spec("fp32"))
    link.settle(1, {3})
    dl2 = link.prepare(2, 3, x, parse_spec("topk:0.01|affine:8|zstd"))
    assert dl2.mode == "delta"
    for k in SHAPES:
        assert np.array_equal(dl2.result.state[k], x[k])
    assert len(dl2.payload) < len(dl1.payload) / 4


def test_node_without_state_gets_full_download_and_refuses_a_delta():
    link = Downlink("delta")
    x = toy(2)
    dl = link.prepare(1, 5, x, parse_spec("topk:0.1|affine:4"))
    assert dl.mode == "full" and dl.spec == "affine:4"  # never starts from a pruned model
    link.settle(1, {5})
    dl2 = link.prepare(2, 5, toy(3), parse_spec("topk:0.1|affine:4"))
    assert dl2.mode == "delta"
    with pytest.raises(StaleDownload, match="holds no copy"):
        node_side(dl2, None)  # the SuperNode restarted and lost its Context state


def test_stale_copy_detected_and_served_in_full_next_round():
    link = Downlink("delta")
    x = toy(4)
    dl = link.prepare(1, 9, x, parse_spec("affine:8"))
    _, held = node_side(dl, None)
    link.settle(1, {9})
    stale = Copy(OrderedDict((k, v + 1.0) for k, v in held.state.items()), "")
    stale.digest = digest(stale.state)
    dl2 = link.prepare(2, 9, toy(5), parse_spec("affine:8"))
    with pytest.raises(StaleDownload, match="applies to copy"):
        node_side(dl2, stale)
    link.settle(2, set())  # its reply was an error: forget the record
    assert link.prepare(3, 9, toy(6), parse_spec("affine:8")).mode == "full"


def test_tampered_delta_result_is_refused_by_digest():
    link = Downlink("delta")
    dl = link.prepare(1, 2, toy(7), parse_spec("affine:8"))
    conf = DownInstruction("full", "", "0" * 32)
    with pytest.raises(StaleDownload, match="digest"):
        client_apply(decode_payload(dl.payload, expected=SHAPES), conf, None)


def test_record_eviction_bounds_memory():
    link = Downlink("delta", max_nodes=2)
    for node in (1, 2, 3):
        link.prepare(1, node, toy(node), parse_spec("fp16"))
    link.settle(1, {1, 2, 3})
    assert list(link.held) == [2, 3]
    assert link.prepare(2, 1, toy(8), parse_spec("fp16")).mode == "full"


def test_full_mode_shares_one_encode_and_sends_no_digest():
    link = Downlink("full")
    x = toy(9)
    a = link.prepare(1, 1, x, parse_spec("affine:8"))
    b = link.prepare(1, 2, x, parse_spec("affine:8"))
    assert a is b and link.message_config(a) == DownInstruction()
    assert DownInstruction().entries() == {"down-mode": "full"}
    state, keep = client_apply(decode_payload(a.payload, expected=SHAPES), DownInstruction(),
                               None)
    assert keep is None and set(state) == set(SHAPES)


# ------------------------------------------------------------------------- through the strategy


def _strategy(method="flocora", **kw):
    cfg = RunConfig(method=method, min_train_nodes=1, min_available_nodes=1, fraction_train=1.0,
                    download="delta", codec_down="affine:4", **kw)
    return get_method(method).Strategy(cfg, SHAPES)


def _reply(msg, tensors, n=10, spec="fp32"):
    return Message(RecordDict({ADAPTER_KEY: encode_record(tensors, spec),
                               METRICS_KEY: MetricRecord({"num-examples": n})}), reply_to=msg)


def test_strategy_commits_on_reply_and_forgets_on_failure(task_identity):
    st = _strategy()
    grid = FakeGrid([11, 12])
    x = toy(10)
    msgs = list(st.configure_train(1, state_to_arrays(x), ConfigRecord(), grid))
    assert [str(m.content[CONFIG_KEY]["down-mode"]) for m in msgs] == ["full", "full"]
    assert st.round_record(1)["full_downloads"] == 2
    ok = _reply(msgs[0], toy(11))
    failed = Message(Error(code=1, reason="boom"), reply_to=msgs[1])
    arrays, _ = st.aggregate_train(1, [ok, failed])
    msgs2 = list(st.configure_train(2, arrays, ConfigRecord(), grid))
    modes = {m.metadata.dst_node_id: str(m.content[CONFIG_KEY]["down-mode"]) for m in msgs2}
    assert modes == {11: "delta", 12: "full"}
    # the node that replied, applying the delta to what it got in round 1, lands on the record
    first = decode_record(msgs[0].content[ADAPTER_KEY], expected=SHAPES)
    conf1 = DownInstruction.from_config(msgs[0].content[CONFIG_KEY])
    _, held = client_apply(first, conf1, None)
    m2 = next(m for m in msgs2 if m.metadata.dst_node_id == 11)
    state, _ = client_apply(decode_record(m2.content[ADAPTER_KEY], expected=SHAPES),
                            DownInstruction.from_config(m2.content[CONFIG_KEY]), held)
    assert digest(state) == str(m2.content[CONFIG_KEY]["down-digest"])
    d2 = next(m for m in msgs2 if m.metadata.dst_node_id == 12)
    assert st.stats[2].payload_down[11] < 1.1 * st.stats[2].payload_down[12]


def test_lora_a2_delta_download_carries_only_changed_rank_slices(task_identity):
    st = _strategy("lora-a2", codec_down_full="fp32", rank_budget=2)  # the 2 changed columns
    st.downlink.full_spec = parse_spec("fp32")
    grid = FakeGrid([21])
    x = toy(12)
    msgs = list(st.configure_train(1, state_to_arrays(x), ConfigRecord(), grid))
    full_bytes = st.stats[1].payload_down[21]
    # round 1 trains B: the client changed 2 of 16 rank columns
    delta = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items()
                        if "lora_B" in k or "lora" not in k)
    delta["m.lora_B.weight"][:, [3, 9]] = 0.5
    arrays, _ = st.aggregate_train(1, [_reply(msgs[0], delta, spec="ranks|fp32")])
    msgs2 = list(st.configure_train(2, arrays, ConfigRecord(), grid))
    conf = dict(msgs2[0].content[CONFIG_KEY])
    assert conf["down-mode"] == "delta" and conf["codec-down"].startswith("ranks|")
    delta_bytes = st.stats[2].payload_down[21]
    # 2/16 of B's columns + fc.bias (dense) + bitmaps, against A+B+bias in full
    assert delta_bytes < 0.25 * full_bytes
    got = decode_record(msgs2[0].content[ADAPTER_KEY], expected=SHAPES)
    changed = np.flatnonzero(np.abs(got["m.lora_B.weight"]).sum(axis=0))
    assert set(changed.tolist()) <= {3, 9} and not np.any(got["m.lora_A.weight"])


def test_flasc_refuses_delta_downloads():
    with pytest.raises(ValueError, match="own sparse download"):
        _strategy("flasc")


# ------------------------------------------------------------------------- delta uploads


@pytest.mark.parametrize("method", ["flocora", "fedavg", "fl-lora", "ffa-lora"])
def test_delta_upload_lands_on_the_same_global_as_weights(method, task_identity):
    """upload=delta: global + weighted mean of updates == weighted mean of weights (lossless)."""
    outs = {}
    x = toy(20)
    trained = [toy(21), toy(22)]
    for mode in ("weights", "delta"):
        cfg = RunConfig(method=method, min_train_nodes=1, min_available_nodes=1,
                        fraction_train=1.0, upload=mode)
        st = get_method(method).Strategy(cfg, SHAPES)
        msgs = list(st.configure_train(1, state_to_arrays(x), ConfigRecord(), FakeGrid([1, 2])))
        assert all(str(m.content[CONFIG_KEY]["upload"]) == mode for m in msgs)
        keys = st.upload_shapes(1)
        replies = []
        for m, t, n in zip(msgs, trained, (10, 30)):
            up = OrderedDict((k, t[k] - x[k] if mode == "delta" else t[k]) for k in keys)
            replies.append(_reply(m, up, n))
        arrays, _ = st.aggregate_train(1, replies)
        outs[mode] = {k: arrays[k].numpy() for k in arrays.keys()}
    for k in SHAPES:
        np.testing.assert_allclose(outs["delta"][k], outs["weights"][k], rtol=1e-5, atol=1e-6)


def test_delta_upload_refused_by_methods_that_need_weights():
    for method in ("flexlora", "hetlora"):
        with pytest.raises(ValueError, match="aggregates client weights"):
            get_method(method).Strategy(RunConfig(method=method, upload="delta"), SHAPES)


@pytest.mark.parametrize("kw,why", [
    ({"codec-up": "sign"}, "use upload='delta'"),
    ({"tier-codec-up": "fp32,sign", "tier-density": "1,1"}, "use upload='delta'"),
    ({"codec-down": "sign"}, "use download='delta'"),
    ({"codec-down": "sign", "download": "delta"}, "set codec-down-full"),
    ({"codec-down": "affine:4", "download": "delta", "codec-down-full": "sign"},
     "codec-down-full 'sign' carries weights"),
    # the default full codec is codec-down without its sparsifier: 'sign|zstd', refused too
    ({"codec-down": "topk:0.1|sign|zstd", "download": "delta"}, "set codec-down-full"),
    # lowrank (a sparsifier) is for updates only too: a weight matrix cut to rank r
    ({"codec-up": "lowrank:2|affine:4"}, "use upload='delta'"),
    ({"codec-down": "lowrank:2|affine:4"}, "use download='delta'"),
    ({"codec-down": "affine:4", "download": "delta", "codec-down-full": "lowrank:1"},
     "codec-down-full 'lowrank:1' carries weights"),
])
def test_a_codec_for_updates_is_refused_wherever_it_would_carry_weights(kw, why):
    def make(over):
        cfg = RunConfig.from_run_config({"method": "fedavg", **over})
        return get_method("fedavg").Strategy(cfg, SHAPES)

    with pytest.raises(ValueError, match=why):
        make(kw)
    # the same chains are accepted where they carry updates
    make({**kw, "upload": "delta", "download": "delta", "codec-down-full": "affine:8|zstd"})



# ------------------------------------------------------------------ download-init (issue 31)
def _node_side_init(dl, held, init_copy, link):
    conf = link.message_config(dl)
    decoded = decode_payload(dl.payload, expected=SHAPES)
    return client_apply(decoded, conf, held, lambda: init_copy)


def test_download_init_sends_a_delta_from_the_initial_state_not_a_full_download():
    """With the initial state known to both sides, a node's first download is codec-down of
    (target − init): same size as any delta, far smaller than the full download, and the node
    ends bit for bit at the server's record (it builds init itself; nothing else is sent)."""
    init = toy(0)
    target = OrderedDict((k, v + 0.05 * toy(1)[k]) for k, v in init.items())
    plain, link = Downlink("delta", "affine:8"), Downlink("delta", "affine:8")
    link.set_init(init)
    pipe = parse_spec("sign:tensor")
    full = plain.prepare(1, 7, target, pipe)
    dl = link.prepare(1, 7, target, pipe)
    assert full.mode == "full" and dl.mode == "delta"
    assert dl.base == link.init.digest and link.message_config(dl).from_init is True
    assert len(dl.payload) * 4 < len(full.payload)
    state, keep = _node_side_init(dl, None, Copy(link.init.state, link.init.digest), link)
    assert keep.digest == dl.result.digest
    for k in target:  # the node starts from init + C(target − init), exactly as recorded
        np.testing.assert_array_equal(state[k], dl.result.state[k])
    link.settle(1, {7})
    assert link.held[7].digest == dl.result.digest and 7 not in link.from_init
    assert link.prepare(2, 7, target, pipe).base == dl.result.digest  # an ordinary delta next


def test_download_init_node_with_another_initial_state_refuses_then_gets_full():
    """A node whose own initial state differs (other seed, other code) refuses the delta with
    StaleDownload naming both digests; its failure makes the server serve it in full from then
    on, while other nodes keep getting deltas from init."""
    init = toy(0)
    link = Downlink("delta", "affine:8")
    link.set_init(init)
    pipe = parse_spec("affine:4")
    dl = link.prepare(1, 7, init, pipe)
    other = toy(5)
    with pytest.raises(StaleDownload, match="applies to copy"):
        _node_side_init(dl, None, Copy(other, digest(other)), link)
    link.prepare(1, 8, init, pipe)
    link.settle(1, {8})  # node 7's reply failed
    assert 7 in link.init_refused
    assert link.prepare(2, 7, init, pipe).mode == "full"
    assert link.prepare(2, 9, init, pipe).mode == "delta"  # a new node still starts at init


def test_download_init_not_used_for_targets_of_another_shape():
    """A rank variant (other shapes) cannot be a delta from the initial state: full download."""
    init = toy(0)
    link = Downlink("delta", "affine:8")
    link.set_init(init)
    smaller = OrderedDict((k, v[:8] if "lora_A" in k else v) for k, v in init.items())
    assert link.prepare(1, 7, smaller, parse_spec("affine:4")).mode == "full"


def test_download_init_needs_delta_downloads():
    from fedlora.validate import ConfigError, check

    with pytest.raises(ConfigError, match="download-init"):
        check({"download-init": True, "download": "full"})
    check({"download-init": True, "download": "delta"})
