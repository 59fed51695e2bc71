"""``drive`` and ``eden:b`` (compression/eden.py, rotate.py): rotated 1-bit and shared-seed sub-bit
codecs. What is proved: the decoded error matches the papers' vNMSE at every width; the
unbiased scale's mean over keys converges to the input where the least-squares one does not;
``drive`` is ``eden:1`` bit for bit; a payload is exactly ``b`` bits a value plus 8 bytes and a
scale a chunk; a receiver with another codec key (or none) refuses the payload; the fast
Walsh–Hadamard kernel is the Sylvester matrix; through the strategy both directions work with
client and server error feedback, streamed or not, and a reply keyed for another node is dropped.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedlora.compression import CodecError, SpecError, codec_key, decode_payload, parse_spec
from fedlora.compression import ErrorFeedback
from fedlora.compression import rotate
from fedlora.strategies.base import ADAPTER_KEY, CONFIG_KEY, arrays_to_state
from fedlora.strategies.downlink import client_apply, digest
from fedlora.strategies.protocol import DownInstruction
from fedlora.wire import decode_record, encode_record

from test_hostile import SHAPES, configure, make, reply, toy

KEY = 0x1234_5678_9ABC_DEF0


def lora_like(seed=0):
    """A LoRA-shaped update: tensors of unequal scale and sizes that are not powers of two."""
    rng = np.random.default_rng(seed)
    return OrderedDict([
        ("l0.lora_A", rng.standard_normal((4, 384)).astype(np.float32)),
        ("l0.lora_B", (0.1 * rng.standard_normal((384, 4))).astype(np.float32)),
        ("l1.lora_A", rng.standard_normal((4, 1000)).astype(np.float32)),
        ("norm.bias", (0.01 * rng.standard_normal(10)).astype(np.float32))])


def flat(t):
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in t.values()])


def vnmse(spec, t, key=KEY):
    pipe = parse_spec(spec).keyed(key)
    got = pipe.decode(pipe.encode(t), expected={k: v.shape for k, v in t.items()})
    x = flat(t)
    return float(np.sum((flat(got) - x) ** 2) / np.sum(x ** 2))


# the papers' asymptotic vNMSE (Gaussian rotated coordinates) and a band around it
@pytest.mark.parametrize("spec,theory,tol", [
    ("drive", np.pi / 2 - 1, 0.06), ("drive:mse", 1 - 2 / np.pi, 0.04),
    ("eden:2", 0.1175 / (1 - 0.1175), 0.03), ("eden:2:mse", 0.1175, 0.02),
    ("eden:4", 0.0095, 0.003), ("eden:0.5", 2 * (np.pi / 2) - 1, 0.3),
    ("eden:0.25:mse", 1 - 0.25 * 2 / np.pi, 0.05), ("drive|zstd", np.pi / 2 - 1, 0.06),
    ("drive:mse:tensor", 1 - 2 / np.pi, 0.04), ("eden:0.5:tensor", 2 * (np.pi / 2) - 1, 0.3)])
def test_round_trip_error_is_the_papers(spec, theory, tol):
    errs = [vnmse(spec, lora_like(s), key=KEY + s) for s in range(4)]
    assert abs(np.mean(errs) - theory) < tol, (spec, errs)


@pytest.mark.parametrize("spec", ["drive:mse", "eden:0.5:mse", "eden:2"])
def test_tensor_flag_gives_every_tensor_the_codecs_error(spec):
    """Rotating the concatenation spreads the error evenly over the values, so a tensor 1000x
    smaller than the rest gets an error 1000s of times its norm; ``:tensor`` (each tensor
    divided by its RMS rounded to a power of two) keeps every tensor's own error below 1.5
    (about the codec's vNMSE; more on a 10-value tensor sampled at 0.5), for 1 byte a tensor."""
    t = lora_like(4)
    t["l1.lora_A"] *= 1e-3
    t["zero"] = np.zeros((3, 5), np.float32)
    shapes = {k: v.shape for k, v in t.items()}

    def per_tensor(s):
        p = parse_spec(s).keyed(KEY)
        payload = p.encode(t)
        got = p.decode(payload, expected=shapes)
        assert not got["zero"].any() or not s.endswith(":tensor")  # exact zeros with :tensor
        return len(payload), {k: float(np.sum((got[k] - t[k]) ** 2) / np.sum(t[k] ** 2))
                              for k in t if t[k].any()}

    n0, plain = per_tensor(spec)
    n1, equal = per_tensor(spec + ":tensor")
    assert plain["l1.lora_A"] > 100 and max(equal.values()) < 1.5  # sampled 10-value bias
    assert n1 - n0 == len(t) + len(":tensor")


def test_drive_is_eden_1_bit_for_bit():
    t = lora_like(1)
    a, b = (parse_spec(s).keyed(KEY) for s in ("drive", "eden:1"))
    pa, pb = a.encode(t), b.encode(t)
    hdr = len(pa) - len(pb)  # the specs differ by one character
    assert pa[len(pa) - 300:] == pb[len(pb) - 300:] and hdr == -1
    da, db = a.decode(pa, expected={k: v.shape for k, v in t.items()}), \
        b.decode(pb, expected={k: v.shape for k, v in t.items()})
    for k in t:
        np.testing.assert_array_equal(da[k], db[k])


@pytest.mark.parametrize("spec,biased", [("drive", "drive:mse"), ("eden:0.5", "eden:0.5:mse"),
                                         ("eden:2", "eden:2:mse")])
def test_unbiased_scale_mean_over_keys_converges_where_least_squares_does_not(spec, biased):
    """Mean of 400 decodes (keys 0..399) of one vector: the unbiased variant's error of the
    mean is near vNMSE/400 (0.005 for drive, 0.008 for eden:0.5); the least-squares variant
    keeps its shrinkage bias (drive:mse ~0.13, eden:0.5:mse ~0.46, eden:2:mse ~0.013)."""
    rng = np.random.default_rng(5)
    t = {"w": rng.standard_normal((3, 700)).astype(np.float32),
         "b": (0.3 * rng.standard_normal(37)).astype(np.float32)}
    x = flat(t)
    shapes = {k: v.shape for k, v in t.items()}

    def mean_err(s):
        acc = np.zeros_like(x)
        for key in range(400):
            p = parse_spec(s).keyed(key)
            acc += flat(p.decode(p.encode(t), expected=shapes))
        return float(np.sum((acc / 400 - x) ** 2) / np.sum(x ** 2))

    unbiased = mean_err(spec)
    assert unbiased < 0.012, unbiased
    assert mean_err(biased) > 0.012


@pytest.mark.parametrize("spec,bits", [("eden:0.25", 0.25), ("eden:0.5|zstd", None),
                                       ("drive", 1), ("eden:2", 2), ("eden:0.1:mse", 0.1)])
def test_payload_is_b_bits_a_value_plus_tag_and_chunk_scales(spec, bits):
    n = 1 << 16
    t = {"x": np.random.default_rng(2).standard_normal(n).astype(np.float32)}
    pipe = parse_spec(spec).keyed(KEY)
    payload = pipe.encode(t)
    header = len(parse_spec("fp32").encode({"x": np.zeros(0, np.float32)})) + len(pipe.spec) \
        - len("fp32") + 2  # the same table, with this spec (shape 65536: 2 more varint bytes)
    if bits is None:  # zstd: random signs do not compress; the raw body is still the bound
        assert len(payload) <= header + 4 + 4 + n // 16 + 64
        return
    k = n if bits >= 1 else -(-n * int(bits * 1000) // 1000)
    starts, sizes = rotate.chunk_plan(k)
    assert sizes.sum() - k < rotate.MIN_CHUNK
    body = 4 + 4 * sizes.size + -(-int(sizes.sum()) * max(1, int(bits)) // 8)
    assert len(payload) == header + body == pipe.predicted_size(t)
    assert bits <= body * 8 / n <= bits + 0.01


def test_chunk_plan_pads_fewer_than_256_values_and_stays_byte_aligned():
    for m in (1, 2, 3, 10, 255, 256, 257, 1546, 9230, 77754, 1 << 14, (1 << 20) + 3):
        starts, sizes = rotate.chunk_plan(m)
        assert all(s & (s - 1) == 0 for s in sizes)
        assert 0 <= sizes.sum() - m < rotate.MIN_CHUNK
        assert all(s >= rotate.MIN_CHUNK for s in sizes[:-1])
        assert np.array_equal(starts, np.concatenate([[0], np.cumsum(sizes)[:-1]]))


def test_fwht_is_the_sylvester_hadamard_matrix():
    for d in (1, 2, 4, 8, 16, 64, 256, 512, 4096):
        h = np.array([[1.0]])
        while h.shape[0] < d:
            h = np.block([[h, h], [h, -h]])
        x = np.random.default_rng(d).standard_normal(d).astype(np.float32)
        y = x.copy()
        rotate.fwht(y, d)
        np.testing.assert_allclose(y, h @ x.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_another_key_or_none_is_refused_with_a_clear_error():
    t = lora_like(2)
    shapes = {k: v.shape for k, v in t.items()}
    payload = parse_spec("eden:0.5|zstd").keyed(codec_key(1, 3, "up", 17)).encode(t)
    with pytest.raises(CodecError, match="codec key tag .* sender and receiver derived"):
        parse_spec("eden:0.5|zstd").keyed(codec_key(1, 3, "up", 18)).decode(payload, shapes)
    with pytest.raises(CodecError, match="needs the codec key"):
        decode_payload(payload, expected=shapes)
    with pytest.raises(CodecError, match="needs a codec key"):
        parse_spec("drive").encode(t)
    got = decode_payload(payload, expected=shapes, key=codec_key(1, 3, "up", 17))
    assert set(got) == set(t)
    # every field of the key changes it
    keys = {codec_key(1, 3, "up", 17), codec_key(2, 3, "up", 17), codec_key(1, 4, "up", 17),
            codec_key(1, 3, "down", 17), codec_key(1, 3, "up", 18), codec_key(1, 3, "down")}
    assert len(keys) == 6


def test_spec_grammar():
    assert parse_spec("eden:0.50:mse|zstd").spec == "eden:0.5:mse|zstd"
    assert parse_spec("eden:2.0").spec == "eden:2"
    assert parse_spec("DRIVE:mse").spec == "drive:mse"
    for bad in ("eden", "eden:5", "eden:0", "eden:1.5", "eden:0.0001", "eden:0.5:x",
                "drive:2", "topk:0.1|drive", "ranks|eden:0.5"):
        with pytest.raises(SpecError):
            parse_spec(bad)
    with pytest.raises(SpecError, match="cannot follow a sparsifier"):
        parse_spec("drive|zstd").with_sparsifier(parse_spec("topk:0.1").sparsifier)
    assert parse_spec("drive:tensor").spec == "drive:tensor"
    for bad in ("drive:tensor:mse", "eden:2:tensor:mse", "drive:mse:mse"):
        with pytest.raises(SpecError):
            parse_spec(bad)
    for spec in ("drive", "drive:mse", "eden:0.25", "eden:3:mse|zstd", "drive:mse:tensor",
                 "eden:0.5:tensor"):
        from fedlora.compression import Pipeline
        p = parse_spec(spec)
        assert Pipeline.from_config(p.get_config()) == p and p.for_updates_only
    assert parse_spec("eden:0.25").max_expansion == 128 and parse_spec("drive").max_expansion == 32
    assert parse_spec("fp32").keyed(5).key is None  # chains without a keyed stage stay as they are


def test_non_finite_and_overflowing_inputs_are_refused():
    with pytest.raises(CodecError, match="NaN or Inf"):
        parse_spec("drive").keyed(1).encode({"x": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(CodecError, match="float32 limit"):
        parse_spec("drive").keyed(1).encode({"x": np.full(4096, 3e38, np.float32)})
    # zeros, a single value, subnormal and large values round trip finite
    for x in (np.zeros(300, np.float32), np.array([-2.5], np.float32),
              np.full(1000, 1e-42, np.float32), np.full(1000, 1e33, np.float32)):
        p = parse_spec("eden:2").keyed(1)
        got = p.decode(p.encode({"x": x}), expected={"x": x.shape})["x"]
        assert np.isfinite(got).all()
        if x.size == 1 or not x.any():
            np.testing.assert_allclose(got, x, rtol=1e-6)


def test_client_error_feedback_residual_stays_bounded_against_what_is_decoded():
    """EF with drive:mse over 40 rounds of a fixed update: the sum of what was decoded tracks
    the sum of the updates up to the residual, which stays below the update's norm."""
    t = lora_like(3)
    shapes = {k: v.shape for k, v in t.items()}
    ef = ErrorFeedback()
    sent = {k: np.zeros(v.shape) for k, v in t.items()}
    for rnd in range(1, 41):
        pipe = parse_spec("drive:mse|zstd").keyed(codec_key(7, rnd, "up", 3))
        comp = ef.compensate(t)
        got = decode_payload(pipe.encode(comp), expected=shapes, key=pipe.key)
        ef.update(comp, got)
        for k in t:
            sent[k] += got[k]
    norm = np.sqrt(np.sum(flat(t) ** 2))
    res = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in ef.residual.values()))
    assert res < 1.5 * norm
    drift = np.sqrt(sum(float(np.sum((sent[k] - 40 * t[k]) ** 2)) for k in t))
    assert abs(drift - res) < 1e-3 * 40 * norm  # sum sent = sum of updates - residual


# ------------------------------------------------------------------------------- strategy


def _node_reply(s, msg, rnd, seed, key_node=None):
    """What client_app does: the codec-up keyed by (seed, round, "up", the ``codec-key-id``
    the server sent: its partition-id where granted, else its node id)."""
    conf = msg.content[CONFIG_KEY]
    who = int(conf["codec-key-id"]) if key_node is None else key_node
    pipe = parse_spec(str(conf["codec-up"])).keyed(codec_key(s.cfg.seed, rnd, "up", who))
    rng = np.random.default_rng(seed)
    up = OrderedDict((k, (0.01 * rng.standard_normal(sh)).astype(np.float32))
                     for k, sh in s.upload_shapes(rnd).items())
    return reply(msg, record=encode_record(up, pipe)), up, pipe


@pytest.mark.parametrize("streamed", [True, False])
def test_strategy_both_directions_with_server_error_feedback(task_identity, streamed):
    s = make("fedavg", upload="delta", download="delta", codec_up="eden:0.5:mse|zstd",
             codec_down="drive:mse", codec_down_full="affine:8|zstd", seed=11,
             stream_aggregation=streamed)
    g = toy(0)
    msgs = configure(s, 1, g, (1, 2, 3))
    held = {}
    for m in msgs:  # round 1: full downloads (weights: affine:8)
        _, held[m.metadata.dst_node_id] = client_apply(
            decode_record(m.content[ADAPTER_KEY], expected=SHAPES,
                          key=codec_key(11, 1, "down")),
            DownInstruction.from_config(m.content[CONFIG_KEY]), None)
    replies, decoded = [], []
    for i, m in enumerate(msgs):
        node = m.metadata.dst_node_id
        r, up, pipe = _node_reply(s, m, 1, i, key_node=424242 if node == 3 else None)
        replies.append(r)
        if node != 3:
            decoded.append(pipe.decode(r.content[ADAPTER_KEY]["payload"].data, SHAPES))
    arrays, _ = s.aggregate_train(1, replies)
    rec = s.round_record(1)
    assert [d["node"] for d in rec["dropped_reasons"]] == [3]
    assert "codec key tag" in rec["dropped_reasons"][0]["reason"]
    new = arrays_to_state(arrays)
    for k in SHAPES:  # global + the mean of what the server decoded (equal weights)
        want = (g[k] + (decoded[0][k].astype(np.float64) + decoded[1][k]) / 2).astype(np.float32)
        np.testing.assert_allclose(new[k], want, rtol=1e-6, atol=1e-7)
    # round 2: the nodes that replied get drive:mse deltas and land on the server's record
    msgs2 = configure(s, 2, new, (1, 2, 3))
    for m in msgs2:
        node, conf = m.metadata.dst_node_id, dict(m.content[CONFIG_KEY])
        if node == 3:
            assert conf["down-mode"] == "full"
            continue
        assert conf["down-mode"] == "delta" and conf["codec-down"] == "drive:mse"
        got = decode_record(m.content[ADAPTER_KEY], expected=SHAPES,
                            key=codec_key(11, 2, "down"))
        state, copy = client_apply(got, DownInstruction.from_config(conf), held[node])
        assert copy.digest == conf["down-digest"] == digest(s.downlink.pending[node][1].state)
        with pytest.raises(CodecError, match="codec key tag"):
            decode_record(m.content[ADAPTER_KEY], expected=SHAPES, key=codec_key(11, 1, "down"))


def test_real_server_and_client_apps_both_directions(tmp_path, sample_dir, task_identity):
    """The ServerApp ``run`` with the real ClientApp ``train`` (tiny FLoCoRA, 3 nodes, 2 rounds):
    eden:0.5 uploads and drive delta downloads, client and server error feedback. Every reply
    decodes (the nodes derive the server's keys), and in round 2 every node applies its delta
    download to the copy it holds (a wrong key or residual would fail the digest check and
    drop or refuse the round)."""
    from fedlora.config import RunConfig
    from fedlora.results import read_rounds
    from fedlora.server_app import run

    from conftest import InProcessGrid

    rc = {"num-server-rounds": 2, "feature-maps": 8, "lora-rank": 4, "local-epochs": 1,
          "max-examples-per-client": 32, "batch-size": 16, "eval-max-examples": 32,
          "fraction-train": 1.0, "min-train-nodes": 3, "min-available-nodes": 3,
          "dataset": "npz", "partitioner": "iid", "client-threads": 1, "device": "cpu",
          "data-dir": sample_dir, "run-dir": str(tmp_path), "run-name": "subbit",
          "method": "flocora", "upload": "delta", "download": "delta",
          "codec-up": "eden:0.5:mse:tensor|zstd", "codec-down": "drive:mse:tensor",
          "codec-down-full": "affine:8|zstd", "error-feedback": True}
    summary = run(InProcessGrid(rc), RunConfig.from_run_config(rc))
    assert summary["rounds"] == 2
    recs = [r for r in read_rounds(tmp_path / "subbit") if r["round"] >= 1]
    assert [(r["clients"], r["dropped"], r["failures"]) for r in recs] == [(3, 0, 0)] * 2
    assert [r["full_downloads"] for r in recs] == [3, 0]


def test_upload_codec_key_names_the_partition_so_runs_repeat(task_identity):
    """Flower draws node ids at random per simulation: an upload key on the node id would make
    two runs with the same seed rotate differently. Where the server has granted a node its
    partition-id, the key names the partition (sent as ``codec-key-id``); else the node id."""
    s = make("fedavg", upload="delta", download="delta", codec_up="drive:mse",
             codec_down="affine:8", seed=5)
    msgs = configure(s, 1, toy(0), (1, 2, 3))
    for m in msgs:
        node = m.metadata.dst_node_id
        part = s.nodes.partitions.get(node, -1)
        conf = m.content[CONFIG_KEY]
        assert int(conf["codec-key-id"]) == (part if part >= 0 else node)
        assert s.key_identity(node) == int(conf["codec-key-id"])
    plain = make("fedavg", upload="delta", download="delta", codec_up="affine:4",
                 codec_down="affine:8", seed=5)
    for m in configure(plain, 1, toy(0), (1, 2, 3)):  # other codecs: not a byte more
        assert "codec-key-id" not in m.content[CONFIG_KEY]
    s.nodes.partitions[1] = 7
    assert s.key_identity(1) == 7 and s.upload_pipeline(1, 1).key == codec_key(5, 1, "up", 7)
    s.nodes.partitions.pop(1)
    assert s.key_identity(1) == 1
