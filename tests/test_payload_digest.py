"""Payload format 2: the tensor table travels as an 8-byte digest (run-config
``payload-table=digest``). What it must keep: the same values as format 1 for every codec, a size
saving of exactly the table's bytes less 8, and a clear refusal (never a body read against the
wrong table) whenever sender and receiver disagree on the names or shapes."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedlora.compression import CodecError, decode_payload, parse_spec
from fedlora.compression.binary import uvarint
from fedlora.compression.payload import (DIGEST_VERSION, FORMAT_VERSION, MAGIC, _encode_table,
                                         table_digest)
from fedlora.config import RunConfig
from fedlora.methods import get_method
from fedlora.strategies.base import ADAPTER_KEY, METRICS_KEY, arrays_to_state, state_to_arrays
from fedlora.strategies.downlink import digest as copy_digest
from fedlora.wire import by_digest, encode_record, message_bytes

from conftest import FakeGrid
from test_codec_fuzz import SPECS, tensors


def shapes_of(t):
    return {k: v.shape for k, v in t.items()}


def table_bytes(t) -> int:
    """Bytes of the format-1 tensor table (count + names + shapes) for ``t``."""
    return len(b"".join(_encode_table([(k, v.shape) for k, v in t.items()])))


@pytest.mark.parametrize("spec", SPECS)
def test_same_values_as_the_named_table_and_exactly_the_table_bytes_less(spec):
    t = tensors(3)
    pipe = parse_spec(spec)
    named, digested = pipe.encode(t), pipe.encode(t, by_digest=True)
    assert named[len(MAGIC)] == FORMAT_VERSION and digested[len(MAGIC)] == DIGEST_VERSION
    assert len(named) - len(digested) == table_bytes(t) - 8
    a = decode_payload(named, expected=shapes_of(t))
    b = decode_payload(digested, expected=shapes_of(t))
    assert list(b) == list(t)  # the caller's order, although the body is in name order
    for k in t:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=False)
    if not pipe.lossless:
        assert pipe.predicted_size(t, by_digest=True) == len(digested)


def test_the_bytes_do_not_depend_on_the_order_the_sender_lists_its_tensors():
    t = tensors(4)
    rev = OrderedDict(reversed(list(t.items())))
    for spec in ("sign", "topk:0.1|affine:4|zstd", "ranks|affine:2"):
        pipe = parse_spec(spec)
        assert pipe.encode(t, by_digest=True) == pipe.encode(rev, by_digest=True)
        # ... while a named table keeps the sender's order (so the bytes differ)
        assert pipe.encode(t) != pipe.encode(rev)
    out = decode_payload(parse_spec("fp32").encode(t, by_digest=True), expected=shapes_of(rev))
    assert list(out) == list(rev) and all(np.array_equal(out[k], t[k]) for k in t)


def _disagreements(t):
    s = shapes_of(t)
    renamed = {("L.lora_A" if k == "l.lora_A" else k): v for k, v in s.items()}
    reshaped = {**s, "w": (40, 3)}           # same element count, other shape
    missing = {k: v for k, v in s.items() if k != "bias"}
    extra = {**s, "more": (2,)}
    return {"renamed": renamed, "reshaped": reshaped, "missing": missing, "extra": extra}


@pytest.mark.parametrize("case", ["renamed", "reshaped", "missing", "extra"])
@pytest.mark.parametrize("spec", ["fp32", "sign", "topk:0.1|affine:4|zstd"])
def test_a_receiver_expecting_other_tensors_is_refused_naming_both_digests(spec, case):
    t = tensors(5)
    payload = parse_spec(spec).encode(t, by_digest=True)
    want = _disagreements(t)[case]
    with pytest.raises(CodecError, match=f"digest {table_digest(shapes_of(t).items()).hex()}.*"
                                         f"{table_digest(want.items()).hex()}"):
        decode_payload(payload, expected=want)


def test_no_expected_shapes_truncated_or_altered_digest_are_refused():
    t = tensors(6)
    payload = parse_spec("sign").encode(t, by_digest=True)
    with pytest.raises(CodecError, match="needs the expected names and shapes"):
        decode_payload(payload)
    head = len(MAGIC) + 1 + len(uvarint(4)) + 4  # magic, version, "sign"
    with pytest.raises(CodecError, match="truncated"):
        decode_payload(payload[:head + 5], expected=shapes_of(t))
    bad = bytearray(payload)
    bad[head] ^= 1
    with pytest.raises(CodecError, match="table digest"):
        decode_payload(bytes(bad), expected=shapes_of(t))
    # the spec is still readable without shapes (what the server checks first)
    from fedlora.compression.payload import read_header
    pipe, table, _ = read_header(payload)
    assert pipe.spec == "sign" and table is None


def test_mutated_digest_payloads_only_raise_codec_error_or_decode_finite_values():
    """2,000 random byte flips / truncations / insertions of format-2 payloads, decoded with the
    right expected shapes: a CodecError, or exactly the expected tensors, all finite."""
    rng = np.random.default_rng(11)
    t = tensors(7)
    want = shapes_of(t)
    base = [parse_spec(s).encode(t, by_digest=True) for s in SPECS]
    outcomes = {"error": 0, "decoded": 0}
    for i in range(2000):
        p = bytearray(base[i % len(base)])
        kind = i % 3
        pos = int(rng.integers(0, len(p)))
        if kind == 0:
            p[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            del p[pos:]
        else:
            p[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        try:
            out = decode_payload(bytes(p), expected=want)
        except CodecError:
            outcomes["error"] += 1
            continue
        outcomes["decoded"] += 1
        assert {k: v.shape for k, v in out.items()} == want
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())
    assert outcomes["error"] > 1000 and outcomes["decoded"] > 0


def test_copy_digest_is_the_same_whatever_order_a_node_holds_its_tensors_in():
    t = OrderedDict(tensors(8))
    assert copy_digest(t) == copy_digest(OrderedDict(reversed(list(t.items()))))
    changed = OrderedDict(t)
    changed["bias"] = changed["bias"] + 1
    assert copy_digest(changed) != copy_digest(t)


def test_payload_table_key_is_checked():
    assert by_digest("digest") and not by_digest("names")
    with pytest.raises(ValueError, match="payload-table"):
        by_digest("hash")


SHAPES = OrderedDict([("b.lora_A.weight", (4, 30)), ("b.lora_B.weight", (30, 4)),
                      ("a.fc.bias", (10,))])


def _round(payload_table: str):
    """One flocora round with sign deltas both ways: the train messages' bytes, the replies'
    bytes and the new global."""
    cfg = RunConfig(method="flocora", min_train_nodes=1, min_available_nodes=1,
                    fraction_train=1.0, upload="delta", download="delta", codec_up="sign",
                    codec_down="sign", codec_down_full="affine:8|zstd",
                    payload_table=payload_table)
    s = get_method("flocora").Strategy(cfg, SHAPES)
    rng = np.random.default_rng(0)
    state = OrderedDict((k, rng.standard_normal(v).astype(np.float32)) for k, v in SHAPES.items())
    msgs = list(s.configure_train(1, state_to_arrays(state), ConfigRecord(), FakeGrid([1, 2])))
    replies = []
    for i, m in enumerate(msgs):
        up = OrderedDict((k, (0.01 * (i + 1) * rng.standard_normal(v)).astype(np.float32))
                         for k, v in reversed(SHAPES.items()))  # the node lists them reversed
        rec = encode_record(up, "sign", digest=by_digest(payload_table))
        replies.append(Message(RecordDict({ADAPTER_KEY: rec, METRICS_KEY: MetricRecord(
            {"num-examples": 10, "train-loss": 1.0})}), reply_to=m))
    arrays, _ = s.aggregate_train(1, replies)
    down = [message_bytes(m) for m in msgs]
    up = [message_bytes(Message(r.content, message_type=MessageType.TRAIN, dst_node_id=1))
          for r in replies]
    return down, up, arrays_to_state(arrays), s.round_record(1)


def test_a_round_with_digest_tables_is_the_same_round_minus_the_table_bytes(task_identity):
    d_down, d_up, d_global, d_rec = _round("digest")
    n_down, n_up, n_global, n_rec = _round("names")
    saved = table_bytes(OrderedDict((k, np.zeros(v)) for k, v in SHAPES.items())) - 8
    assert d_rec["dropped"] == n_rec["dropped"] == 0
    for k in SHAPES:
        assert np.array_equal(d_global[k], n_global[k])
    # Flower's Array also states the payload's length: a shorter payload can save a varint byte
    assert all(0 <= n - d - saved <= 1 for n, d in zip(n_down + n_up, d_down + d_up))
    assert d_rec["bytes_up"] < n_rec["bytes_up"] and d_rec["bytes_down"] < n_rec["bytes_down"]


def test_a_reply_whose_digest_names_other_tensors_is_dropped_and_the_round_survives(task_identity):
    """A node that sends a format-2 reply for tensors the server does not expect (here one
    renamed): dropped with the digest mismatch as its reason, the others aggregated."""
    cfg = RunConfig(method="flocora", min_train_nodes=1, min_available_nodes=1,
                    fraction_train=1.0, upload="delta", codec_up="affine:8")
    s = get_method("flocora").Strategy(cfg, SHAPES)
    state = OrderedDict((k, np.zeros(v, np.float32)) for k, v in SHAPES.items())
    msgs = list(s.configure_train(1, state_to_arrays(state), ConfigRecord(), FakeGrid([1, 2])))
    good = OrderedDict((k, np.full(v, 0.01, np.float32)) for k, v in SHAPES.items())
    bad = OrderedDict(("b.lora_A.weight2" if k == "b.lora_A.weight" else k, v)
                      for k, v in good.items())
    replies = [Message(RecordDict({ADAPTER_KEY: encode_record(t, "affine:8", digest=True),
                                   METRICS_KEY: MetricRecord({"num-examples": 10,
                                                              "train-loss": 1.0})}), reply_to=m)
               for m, t in zip(msgs, (good, bad))]
    arrays, _ = s.aggregate_train(1, replies)
    rec = s.round_record(1)
    assert rec["dropped"] == 1 and "table digest" in rec["dropped_reasons"][0]["reason"]
    out = arrays_to_state(arrays)
    np.testing.assert_allclose(out["a.fc.bias"], 0.01, atol=1e-4)  # the good update alone
