"""Streaming aggregation (fedlora/strategies/stream.py, issue 16): each reply decoded, checked
and added to a running weighted sum, then freed. Compared with the decode-all path
(``stream-aggregation=false``) on the same replies: bit-identical when nobody is dropped or
clipped, equal to float rounding when replies are clipped, rejected, fail to decode or hold
1e30; and the server's peak memory is the sum plus one reply, not every reply."""

from __future__ import annotations

import tracemalloc
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedlora.strategies import stream
from fedlora.strategies.base import arrays_to_state

from test_hostile import AVERAGING, configure, honest, hostile_values, make, reply, toy


def both(method, replies_of, **kw):
    """The same replies aggregated by a streaming and a decode-all strategy: (new globals,
    round records)."""
    out = []
    for streamed in (True, False):
        s = make(method, stream_aggregation=streamed, **kw)
        assert stream.streams(s) is streamed
        g = toy(0)
        msgs = configure(s, 1, g, (1, 2, 3, 4, 5))
        arrays, metrics = s.aggregate_train(1, replies_of(s, msgs))
        out.append((arrays_to_state(arrays) if arrays is not None else None,
                    s.round_record(1), metrics))
    return out


@pytest.mark.parametrize("codec", ["affine:8", "topk:0.3|affine:4"])
@pytest.mark.parametrize("upload", ["weights", "delta"])
@pytest.mark.parametrize("method", AVERAGING)
def test_honest_round_is_bit_identical_to_decoding_every_reply(task_identity, method, upload,
                                                               codec):
    """Streamed = decode-all, bit for bit: dense affine replies (sectioned when every node holds
    the same model), top-k affine deltas (read by the compiled top-k reader, added at their
    positions) and top-k weights (decoded one by one)."""
    def replies(s, msgs):  # unequal weights, one capped (40 > 3 x median 10)
        return [reply(m, honest(s, m, 1, i), n=n)
                for i, (m, n) in enumerate(zip(msgs, (10, 5, 40, 10, 12)))]

    (a, ra, ma), (b, rb, mb) = both(method, replies, upload=upload, codec_up=codec)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert ra["capped_weights"] == rb["capped_weights"] != []
    assert (ra["clients"], ra["payload_up"], ra["bytes_up"]) == \
        (rb["clients"], rb["payload_up"], rb["bytes_up"])
    assert dict(ma) == dict(mb)


@pytest.mark.parametrize("action", ["clip", "reject"])
@pytest.mark.parametrize("scale", [10.0, 1e30])
def test_clipped_rejected_and_1e30_updates_match_the_decode_all_path(task_identity, action,
                                                                     scale):
    """A 10x outlier is corrected in place; a 1e30 one makes the round sum again (a correction
    would cancel every honest digit in float64)."""
    def replies(s, msgs):
        out = [reply(m, honest(s, m, 1, i)) for i, m in enumerate(msgs[:4])]
        bad = (hostile_values(s, 1, np.float32(scale)) if scale > 1e3
               else honest(s, msgs[4], 1, 9, scale=0.01 * scale * 10))
        return out + [reply(msgs[4], bad)]

    (a, ra, _), (b, rb, _) = both("flocora", replies, upload="delta",
                                  norm_bound_action=action)
    assert [c["node"] for c in ra["clipped"]] == [c["node"] for c in rb["clipped"]]
    assert ra["dropped"] == rb["dropped"] == (1 if action == "reject" else 0)
    assert (ra["clipped"] or ra["dropped"]) and ra["norm_bound"] == pytest.approx(rb["norm_bound"])
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_a_reply_that_fails_to_decode_after_its_weight_was_counted(task_identity):
    """Weights are set from every reply's metadata before decoding; a payload that then fails
    leaves the survivors' weighted mean (the sum is rescaled), as the decode-all path."""
    def replies(s, msgs):
        out = [reply(m, honest(s, m, 1, i), n=n) for i, (m, n) in
               enumerate(zip(msgs[:4], (10, 20, 30, 40)))]
        garbage = ArrayRecord({"payload": Array(dtype="uint8", shape=(5,), stype="fedlora/v2",
                                                data=b"junk!")})
        return out + [reply(msgs[4], record=garbage, n=1000)]

    (a, ra, ma), (b, rb, mb) = both("fl-lora", replies, upload="delta", max_weight_ratio=0.0)
    assert ra["dropped"] == rb["dropped"] == 1 and ra["clients"] == 4
    assert ma["num-examples"] == mb["num-examples"] == 100
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("density", [1.0, 0.25, 0.05])
def test_flasc_streams_its_plain_mean_bit_identically(task_identity, density, monkeypatch):
    """FLASC's pseudo-gradient (Σ x_i / n in float64, then the server optimizer): the streamed
    sum is the same sum in the same order, added at the kept positions only (no dense copy of
    a reply: FLASC's fp32 top-k replies go through kernels.flat_add_and_sumsq), so the new
    global is bit-identical. At density 1 the chain has no top-k and replies take the dense path."""
    def replies(s, msgs):
        return [reply(m, honest(s, m, 1, i), n=n)
                for i, (m, n) in enumerate(zip(msgs, (10, 5, 40, 10, 12)))]

    calls = []
    from fedlora.strategies import kernels
    real = kernels.flat_add_and_sumsq
    monkeypatch.setattr(kernels, "flat_add_and_sumsq",
                        lambda *a: calls.append(1) or real(*a))
    (a, ra, _), (b, rb, _) = both("flasc", replies, density_up=density, server_opt="adamw")
    assert len(calls) == (5 if density < 1 else 0)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert ra["clients"] == rb["clients"] == 5 and ra["rejected"] == rb["rejected"] == ""


def test_methods_that_need_every_update_do_not_stream(task_identity):
    for method in ("lora-a2", "flexlora", "hetlora"):
        assert not stream.streams(make(method))
    assert not stream.streams(make("flocora", aggregation="median"))
    assert not stream.streams(make("flocora", upload="delta", dp="central",
                                   dp_noise_multiplier=0.0, norm_bound_factor=0.0))
    assert stream.streams(make("flocora")) and stream.streams(make("flasc"))


def test_peak_memory_is_the_sum_plus_one_reply(task_identity, monkeypatch):
    """30 replies of a 1M-parameter upload: the decode-all path holds all 30 decoded (120 MB);
    the streamed one its float64 sum (8 MB) plus one reply and its decoding (measured: 3.5x
    the model in all)."""
    import test_hostile as th

    big = OrderedDict([("m0.lora_A.weight", (64, 8192)), ("m0.lora_B.weight", (8192, 64)),
                       ("fc.bias", (16,))])
    monkeypatch.setattr(th, "SHAPES", big)
    model_bytes = 4 * sum(int(np.prod(s)) for s in big.values())
    peaks = {}
    for streamed in (True, False):
        s = make("flocora", stream_aggregation=streamed, upload="delta", codec_up="affine:8")
        msgs = configure(s, 1, toy(0), range(1, 31))
        replies = [reply(m, honest(s, m, 1, i)) for i, m in enumerate(msgs)]
        tracemalloc.start()
        arrays, _ = s.aggregate_train(1, replies)
        peaks[streamed] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert arrays is not None and s.round_record(1)["clients"] == 30
    assert peaks[False] > 30 * model_bytes
    assert peaks[True] < 4 * model_bytes, peaks  # issue 16: ≤ 3x the model + one reply


# ------------------------------------------------------------------------------------------
# the compiled passes (fedlora/strategies/kernels.py)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 65_537])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_ref", [False, True])
def test_fused_add_gives_numpys_weighted_sum_and_the_norm_guard_measures(n, dtype, with_ref):
    """add_and_sumsq: acc is bit for bit numpy's ``acc += w * x.astype(float64)`` (what
    weighted_mean does), its sum of squares is bit for bit sumsq's (what guard.update_norm
    takes the root of, on the decode-all path), and both are the exact sum to float64
    rounding."""
    from fedlora.strategies import guard, kernels

    rng = np.random.default_rng(n)
    t = OrderedDict([("a", (rng.standard_normal((n,)) * 3).astype(dtype)),
                     ("b", rng.standard_normal((3, 5)).astype(dtype))])
    ref = OrderedDict((k, rng.standard_normal(v.shape).astype(np.float32)) for k, v in t.items()) \
        if with_ref else None
    w = 0.37
    start = OrderedDict((k, rng.standard_normal(v.shape)) for k, v in t.items())
    acc = OrderedDict((k, v.copy()) for k, v in start.items())
    ss = kernels.add_and_sumsq(acc, t, w, ref)
    for k in t:
        want = start[k].copy()
        want += w * t[k].astype(np.float64)
        assert acc[k].tobytes() == want.tobytes()
    assert ss == kernels.sumsq(t, ref)
    assert guard.update_norm(t, ref) == np.sqrt(ss)
    d = [float(x) for k in t for x in (t[k].astype(np.float64) - (
        ref[k].astype(np.float64) if ref is not None else 0.0)).ravel()]
    exact = float(np.sum(np.square(np.array(d, np.longdouble)))) if d else 0.0
    assert ss == pytest.approx(exact, rel=1e-13, abs=0.0)


@pytest.mark.parametrize("with_ref", [False, True])
def test_the_norm_is_eight_lanes_in_order_across_blocks(with_ref):
    """The sum of squares is defined, not left to the compiler: lane j adds (x_i − ref_i)² for
    i ≡ j (mod 8) in order of i, the squares past the last full 8 go to a ninth, and the lanes
    are combined pairwise — across _pass's blocks and the tiles of the sectioned path alike
    (a tensor of two blocks and a tail; scalar Python float64 is the reference)."""
    from fedlora.strategies import kernels

    n = 2 * kernels._TILE + 13
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(n) * np.exp(rng.standard_normal(n) * 4)).astype(np.float32)
    ref = rng.standard_normal(n).astype(np.float32) if with_ref else None
    lanes = [0.0] * 9
    n8 = n - n % 8
    for i, v in enumerate(x.tolist()):
        d = v - (float(ref[i]) if with_ref else 0.0)
        lanes[i % 8 if i < n8 else 8] += d * d
    want = (((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))) + lanes[8]
    refs = {"a": ref} if with_ref else None
    assert kernels.sumsq({"a": x}, refs) == want
    acc = {"a": np.zeros(n)}
    assert kernels.add_and_sumsq(acc, {"a": x}, 0.5, refs) == want
    assert acc["a"].tobytes() == (0.5 * x.astype(np.float64)).tobytes()


def test_fused_add_refuses_mismatched_shapes_before_touching_the_sum():
    """A bad tensor anywhere in an update leaves the running sum exactly as it was (the checks
    all run before the first add), and shapes — not only sizes — must match."""
    from fedlora.strategies import kernels

    acc = OrderedDict([("a", np.ones((2, 3))), ("b", np.ones(4))])
    before = {k: v.copy() for k, v in acc.items()}
    good_a = np.full((2, 3), 5.0, np.float32)
    for bad in ({"a": good_a, "b": np.ones(5, np.float32)},        # wrong size, after a good one
                {"a": good_a.reshape(3, 2), "b": np.ones(4, np.float32)},  # same size, wrong shape
                {"a": good_a}):                                     # a tensor missing
        with pytest.raises(ValueError):
            kernels.add_and_sumsq(acc, bad, 1.0)
        assert all(np.array_equal(acc[k], before[k]) for k in acc)
    with pytest.raises(ValueError, match="reference"):
        kernels.add_and_sumsq(acc, {"a": good_a, "b": np.ones(4, np.float32)}, 1.0,
                              {"a": np.zeros((2, 3), np.float32)})  # reference without b
    assert all(np.array_equal(acc[k], before[k]) for k in acc)
    with pytest.raises(ValueError, match="reference"):
        kernels.sumsq({"a": np.ones((2, 3), np.float32)}, {"a": np.ones((3, 2), np.float32)})


# ------------------------------------------------------------------------------------------
# decoding straight into the sum (kernels.sections_add_and_sumsq, stream step 2a)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("with_ref", [False, True])
def test_sections_into_the_sum_give_the_bits_of_decoding_each_reply(bits, with_ref):
    """Five replies of affine:b payloads added from their sections, tile by tile (tensors of
    several tiles, a tail that is not a multiple of 8, short lora_B rows, a raw 1-D tensor),
    give the float64 sum and the per-reply sums of squares of add_and_sumsq over the decoded
    tensors, bit for bit, at every bit width (the 8-bit, 4-bit and straddling-field paths)."""
    from fedlora.compression import parse_spec
    from fedlora.strategies import kernels

    rng = np.random.default_rng(bits)
    shapes = OrderedDict([("l.lora_A.weight", (5, 9001)), ("l.lora_B.weight", (4099, 5)),
                          ("norm.weight", (37,)), ("tiny", (3, 3))])
    pipe = parse_spec(f"affine:{bits}")
    ref = OrderedDict((k, rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()) \
        if with_ref else None
    payloads = [pipe.encode(OrderedDict((k, (rng.standard_normal(s) * (q + 1)).astype(
        np.float32)) for k, s in shapes.items())) for q in range(5)]
    weights = [0.1, 0.3, 0.05, 0.25, 0.3]
    want = OrderedDict((k, np.zeros(s)) for k, s in shapes.items())
    want_ss = [kernels.add_and_sumsq(want, pipe.decode(p, expected=shapes), w, ref)
               for p, w in zip(payloads, weights)]
    got = OrderedDict((k, np.zeros(s)) for k, s in shapes.items())
    flats = [pipe.sections(p, shapes, flat=True) for p in payloads]
    secs = flats[0].sections()
    assert secs["l.lora_A.weight"].kind == "affine"
    assert secs["norm.weight"].kind == "dense"  # 1-D: raw float32, a view of the payload
    got_ss = kernels.sections_add_and_sumsq(got, flats, weights, ref)
    assert got_ss == want_ss
    for k in shapes:
        assert got[k].tobytes() == want[k].tobytes(), k


def test_sections_are_checked_as_a_decode_checks(task_identity):
    """Pipeline.sections (one by one and flat) makes every check decode makes, with the same
    errors: another chain, wrong shapes, a bad scale, trailing bytes; values() is decode's
    output."""
    from fedlora.compression import CodecError, parse_spec

    shapes = OrderedDict([("w", (4, 10)), ("b", (3,))])
    t = OrderedDict([("w", np.arange(40, dtype=np.float32).reshape(4, 10)),
                     ("b", np.ones(3, np.float32))])
    pipe = parse_spec("affine:3")
    good = pipe.encode(t)
    secs = pipe.sections(good, shapes)
    dec = pipe.decode(good, expected=shapes)
    for k in shapes:
        assert secs[k].values(shapes[k]).tobytes() == dec[k].tobytes()
    bad_scale = bytearray(good)
    head = len(good) - (1 + 4 * 5 + 15 + 12)  # w's section: zw, 4 scales, 4 zeros, 15 bytes
    bad_scale[head + 1:head + 5] = np.float32(-1).tobytes()
    cases = [(parse_spec("affine:4").encode(t), "encoded with"),
             (good + b"\x00", "trailing"),
             (bytes(bad_scale), "non-positive affine scale")]
    for payload, why in cases:
        for fn in (lambda p: pipe.sections(p, shapes),
                   lambda p: pipe.sections(p, shapes, flat=True),
                   lambda p: pipe.decode(p, expected=shapes)):
            with pytest.raises(CodecError, match=why):
                fn(payload)
    with pytest.raises(CodecError, match="shape"):
        pipe.sections(parse_spec("affine:3").encode(
            OrderedDict([("w", np.ones((5, 8), np.float32)), ("b", np.ones(3, np.float32))]),
            by_digest=False), shapes)
    with pytest.raises(NotImplementedError):
        parse_spec("affine:4|zstd").sections(good, shapes)


def test_stream_decodes_dense_affine_replies_into_the_sum_and_falls_back_otherwise(
        task_identity, monkeypatch):
    """A round of affine:4 replies (broadcast reference) goes through step 2a; top-k replies
    and a method with its own validate_update through step 2b; both bit-identical to
    decode-all (test_honest_round_is_bit_identical_to_decoding_every_reply covers the rest)."""
    from fedlora.strategies import kernels

    calls = []
    real = kernels.sections_add_and_sumsq
    monkeypatch.setattr(kernels, "sections_add_and_sumsq",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def replies(s, msgs):
        return [reply(m, honest(s, m, 1, i), n=n) for i, (m, n) in enumerate(zip(msgs, (10, 5, 40,
                                                                                       10, 12)))]

    for spec, sectioned in (("affine:4", True), ("fp32", True), ("topk:0.5|affine:4", False),
                            ("affine:4|zstd", False)):
        calls.clear()
        (a, ra, _), (b, rb, _) = both("flocora", replies, codec_up=spec)
        assert bool(calls) is sectioned, spec
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        assert ra["clients"] == rb["clients"] == 5
    # a hostile reply among them is dropped with a decode's error, the rest still sectioned
    calls.clear()

    def with_bad(s, msgs):
        out = replies(s, msgs)
        out[2] = reply(msgs[2], honest(s, msgs[2], 1, 2), spec="affine:8")
        return out

    (a, ra, _), (b, rb, _) = both("flocora", with_bad, codec_up="affine:4")
    assert calls and ra["clients"] == rb["clients"] == 4
    assert ra["dropped_reasons"] == rb["dropped_reasons"] and "affine:8" in str(
        ra["dropped_reasons"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("density", [0.5, 0.03, 1.0])
def test_sparse_add_is_the_dense_add_bit_for_bit(density):
    """kernels.sparse_add_and_sumsq on a top-k payload's sections (bitmap mode at 0.5, gap
    varints at 0.03, every value at 1.0; tensors whose size is not a multiple of 8, one that
    keeps nothing) adds exactly what add_and_sumsq adds for the decoded dense tensors, into a
    running sum that already holds another reply, and returns the same sum of squares."""
    from fedlora.compression import parse_spec
    from fedlora.strategies import kernels

    rng = np.random.default_rng(3)
    t = OrderedDict([("a", rng.standard_normal((37, 29)).astype(np.float32)),
                     ("b", rng.standard_normal(1003).astype(np.float32)),
                     ("c", (1e-9 * rng.standard_normal(13)).astype(np.float32))])
    pipe = parse_spec(f"topk:{density}")
    payload = pipe.encode(t)
    shapes = {k: v.shape for k, v in t.items()}
    secs = pipe.sparse_sections(payload, shapes)
    modes = {type(s.where).__name__ if s.where is None else s.where.dtype.name
             for s in secs.values()}
    assert modes == ({"NoneType"} if density == 1.0 else
                     {"bool", "NoneType"} if density == 0.5 else {"int64", "NoneType"})
    dense = pipe.decode(payload, shapes)
    start = OrderedDict((k, rng.standard_normal(v.shape)) for k, v in t.items())
    acc1 = OrderedDict((k, v.copy()) for k, v in start.items())
    acc2 = OrderedDict((k, v.copy()) for k, v in start.items())
    s1 = kernels.add_and_sumsq(acc1, dense, 0.3)
    s2 = kernels.sparse_add_and_sumsq(acc2, secs, 0.3)
    assert s1 == s2
    for k in t:
        assert acc1[k].tobytes() == acc2[k].tobytes()
        np.testing.assert_array_equal(secs[k].values(shapes[k]), dense[k])
    # the whole reply in flat arrays (one compiled pass), into a one-buffer running sum, with
    # the expected order not the payload's: the same bits, the norm summed in the sum's order
    flat = pipe.sparse_sections(payload, shapes, flat=True)
    assert type(flat).__name__ == "FlatSparse"
    order = ["c", "a", "b"]
    acc3 = kernels.zeros_sum(OrderedDict((k, shapes[k]) for k in order))
    for k in order:
        acc3[k][...] = start[k]
    acc4 = OrderedDict((k, start[k].copy()) for k in order)
    s3 = kernels.flat_add_and_sumsq(acc3, flat, 0.3)
    s4 = kernels.add_and_sumsq(acc4, OrderedDict((k, dense[k]) for k in order), 0.3)
    assert s3 == s4
    for k in t:
        assert acc3[k].tobytes() == acc4[k].tobytes() == acc1[k].tobytes()
    back = flat.sections()
    for k in t:
        np.testing.assert_array_equal(back[k].values(shapes[k]), dense[k])


def test_sparse_add_refuses_sections_that_do_not_fit(task_identity):
    """Positions outside the tensor, or a bitmap with more set bits than values, raise (the
    reader refuses both; the kernel reads no memory past its arrays)."""
    from fedlora.compression.sparsify import SparseSection
    from fedlora.strategies import kernels

    acc = OrderedDict([("a", np.zeros(10))])
    vals = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="outside"):
        kernels.sparse_add_and_sumsq(acc, {"a": SparseSection(np.array([3, 10]), vals, 10)}, 1.0)
    with pytest.raises(ValueError, match="outside"):  # unsorted: the ends look in range
        kernels.sparse_add_and_sumsq(acc, {"a": SparseSection(np.array([3, 99, 4]),
                                                              np.ones(3, np.float32), 10)}, 1.0)
    mask = np.zeros(10, bool)
    mask[[1, 2, 3]] = True
    with pytest.raises(ValueError, match="set bits"):
        kernels.sparse_add_and_sumsq(acc, {"a": SparseSection(mask, vals, 10)}, 1.0)
    with pytest.raises(ValueError, match="not the running sum"):
        kernels.sparse_add_and_sumsq(acc, {"b": SparseSection(None, vals, 2)}, 1.0)
    from fedlora.compression.sparsify import FlatSparse

    acc = kernels.zeros_sum({"a": (10,)})
    bad = FlatSparse(["a"], np.array([10]), np.array([2]), np.array([3, 10]), vals)
    with pytest.raises(ValueError, match="outside"):
        kernels.flat_add_and_sumsq(acc, bad, 1.0)
    over = FlatSparse(["a"], np.array([10]), np.array([3]), np.array([1, 2, 3]), vals)
    with pytest.raises(ValueError, match="more kept values"):
        kernels.flat_add_and_sumsq(acc, over, 1.0)
    with pytest.raises(ValueError, match="not the running sum"):
        kernels.flat_add_and_sumsq(acc, FlatSparse(["b"], np.array([2]), np.array([2]),
                                                   np.array([0, 1]), vals), 1.0)
