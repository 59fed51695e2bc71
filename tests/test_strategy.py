"""Server halves on toy data: exact aggregation, and corrupt replies dropped, not fatal."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Error, Message, MessageType,
                      MetricRecord, RecordDict)

from fedlora.compression import parse_spec
from fedlora.config import RunConfig
from fedlora.methods import get_method
from fedlora.strategies.base import (ADAPTER_KEY, METRICS_KEY, arrays_to_state, state_to_arrays)
from fedlora.wire import encode_record

from conftest import FakeGrid

SHAPES = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (4, 2), "fc.bias": (4,)}


def toy(seed):
    rng = np.random.default_rng(seed)
    return OrderedDict((k, rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items())


def make_strategy(method="flocora", **cfg):
    cfg = RunConfig(method=method, min_train_nodes=1, min_available_nodes=1, fraction_train=1.0,
                    **cfg)
    return get_method(method).Strategy(cfg, SHAPES)


def reply_to(msg, tensors=None, n=10, record=None, spec="fp32"):
    content = RecordDict({
        ADAPTER_KEY: record if record is not None else encode_record(tensors, spec),
        METRICS_KEY: MetricRecord({"num-examples": n, "train-loss": 1.0}),
    })
    return Message(content, reply_to=msg)


def sent(strategy, rnd=1, nodes=(11, 12, 13)):
    state = toy(0)
    msgs = list(strategy.configure_train(rnd, state_to_arrays(state), ConfigRecord(),
                                         FakeGrid(nodes)))
    return state, msgs


def test_flocora_aggregate_equals_hand_weighted_mean(task_identity):
    strategy = make_strategy()
    _, msgs = sent(strategy)
    ups, ns = [toy(s) for s in (1, 2, 3)], [10, 30, 60]
    replies = [reply_to(m, u, n) for m, u, n in zip(msgs, ups, ns)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = arrays_to_state(arrays)
    for k in SHAPES:
        expect = (10 * ups[0][k] + 30 * ups[1][k] + 60 * ups[2][k]) / 100
        np.testing.assert_allclose(out[k], expect, rtol=1e-6, atol=1e-6)
    assert metrics["num-examples"] == 100
    rec = strategy.round_record(1)
    assert rec["clients"] == 3 and rec["bytes_up"] > 0 and rec["bytes_down"] > 0


def test_corrupt_reply_dropped_round_survives(task_identity):
    # the one valid reply replaces the model (an update larger than the global itself): the
    # bound of a one-reply round 1 (norm-bound-global) would clip it; this test is the drops
    strategy = make_strategy(norm_bound_history=0)
    _, msgs = sent(strategy)
    good = toy(5)
    bad_payload = ArrayRecord({"payload": Array(dtype="uint8", shape=(7,),
                                                stype="fedlora/v2", data=b"garbage")})
    replies = [
        reply_to(msgs[0], good, 10),
        reply_to(msgs[1], record=bad_payload),                       # does not decode
        reply_to(msgs[2], OrderedDict(list(good.items())[:2]), 10),  # wrong tensor set
        Message(Error(code=0, reason="boom"), reply_to=msgs[0]),     # a second reply of node 11
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    out = arrays_to_state(arrays)
    for k in SHAPES:
        np.testing.assert_allclose(out[k], good[k], rtol=1e-6)
    rec = strategy.round_record(1)
    assert rec["dropped"] == 3 and rec["failures"] == 0 and rec["clients"] == 1
    assert "CodecError" in rec["dropped_reasons"][0]["reason"]
    assert "second reply" in rec["dropped_reasons"][2]["reason"]  # not node 11's failure


def test_nan_upload_and_bad_num_examples_dropped(task_identity):
    strategy = make_strategy()
    _, msgs = sent(strategy)
    marked = toy(1)
    marked["fc.bias"][0] = 1234.5
    record = encode_record(marked, "fp32")      # the encoder refuses NaN, so forge one
    arr = record["payload"]
    data = bytes(arr.data).replace(np.float32(1234.5).tobytes(), np.float32(np.nan).tobytes())
    forged = ArrayRecord({"payload": Array(dtype="uint8", shape=(len(data),), stype=arr.stype,
                                           data=data)})
    arrays, _ = strategy.aggregate_train(1, [reply_to(msgs[0], record=forged),
                                             reply_to(msgs[1], toy(2), 0)])
    assert arrays is None                      # nothing valid: the global model is kept
    assert strategy.round_record(1)["dropped"] == 2


def test_download_carries_config_and_codec(task_identity):
    strategy = make_strategy(codec_down="fp16", codec_up="affine:8")
    _, msgs = sent(strategy, nodes=(5, 6))
    cfg = msgs[0].content["config"]
    assert cfg["codec-down"] == "fp16" and cfg["codec-up"] == "affine:8"
    assert cfg["method"] == "flocora" and cfg["server-round"] == 1
    assert {m.metadata.dst_node_id for m in msgs} == {5, 6}
    assert msgs[0].metadata.message_type == MessageType.TRAIN


def test_bad_codec_spec_fails_at_start():
    with pytest.raises(ValueError):
        make_strategy(codec_up="affine:99")


def _sampled_partitions(partition_of, rounds=4, seed=42, sampling="partition"):
    cfg = RunConfig(method="flocora", min_train_nodes=1, min_available_nodes=1,
                    fraction_train=0.3, seed=seed, client_sampling=sampling)
    strategy = get_method("flocora").Strategy(cfg, SHAPES)
    grid = FakeGrid(list(partition_of), partition_of)
    out = []
    for rnd in range(1, rounds + 1):
        msgs = strategy.configure_train(rnd, state_to_arrays(toy(0)), ConfigRecord(), grid)
        out.append(sorted(partition_of[m.metadata.dst_node_id] for m in msgs))
        if sampling == "partition":
            assert strategy.round_record(rnd)["partitions"] == out[-1]
    return out, grid, strategy


def test_partition_sampling_is_the_same_whatever_node_ids_flower_assigns(task_identity):
    """Two runs with the same seed whose 10 nodes got different random node ids train the same
    partitions in every round (Flower's own sampling would pick by node id); the partition-ids
    are learnt with one query per node, counted as control bytes."""
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(2):
        ids = rng.choice(1 << 40, size=10, replace=False).tolist()
        runs.append(_sampled_partitions({int(n): p for n, p in zip(ids, range(10))}))
    (a, grid_a, strat_a), (b, _, _) = runs
    assert a == b
    assert all(len(r) == 3 for r in a) and len({tuple(r) for r in a}) > 1  # rounds differ
    assert grid_a.queries == 10  # once per node, not per round
    assert strat_a.round_record(1)["control_bytes"] > 0 == strat_a.round_record(2)["control_bytes"]
    other_seed, _, _ = _sampled_partitions(runs[0][1].partition_of, seed=7)
    assert other_seed != a


def test_flower_sampling_and_a_bad_sampling_value(task_identity):
    partition_of = {100 + p: p for p in range(10)}
    out, grid, _ = _sampled_partitions(partition_of, sampling="flower")
    assert all(len(r) == 3 for r in out) and grid.queries == 0  # no tiers, no partitions asked
    with pytest.raises(ValueError, match="client-sampling"):
        get_method("flocora").Strategy(RunConfig(client_sampling="random"), SHAPES)


def test_the_strategy_writes_each_rounds_record_after_the_evaluation(task_identity, tmp_path):
    """end_round: the central evaluation runs first, then the checkpoint, then the record the
    strategy's ledger made (bytes of this round's replies + the evaluation's metrics) goes to
    the recorder — the ServerApp's evaluate_fn only evaluates."""
    from fedlora.results import Recorder

    strategy = make_strategy()
    _, msgs = sent(strategy)
    strategy.aggregate_train(1, [reply_to(m, toy(i), 10) for i, m in enumerate(msgs)])
    order: list[str] = []
    recorder = Recorder(tmp_path, {"config": {}})
    strategy.keep_records(recorder, analytic_bytes_per_upload=100.0,
                          save=lambda rnd, arrays, records: order.append(f"save {rnd}"))

    def evaluate_fn(rnd, arrays):
        order.append(f"eval {rnd}")
        return MetricRecord({"accuracy": 0.5}) if rnd == 1 else None

    strategy.end_round(0, state_to_arrays(toy(0)), evaluate_fn)
    strategy.end_round(1, state_to_arrays(toy(0)), evaluate_fn)
    assert order == ["eval 0", "eval 1", "save 1"]  # no checkpoint of the initial model
    r0, r1 = recorder.records
    assert r0["round"] == 0 and "accuracy" not in r0 and r0["bytes_up"] == 0
    assert r1["accuracy"] == 0.5 and r1["clients"] == 3
    assert r1["bytes_up"] == strategy.round_record(1)["bytes_up"] > 0
    assert r1["analytic_bytes_up"] == 300.0
    assert (tmp_path / "rounds.jsonl").read_text().count("\n") == 2


def test_the_wire_carries_the_codec_spec_once_in_the_payload_header():
    """Wire v2: the Array's stype is the constant version tag and the spec is read from the
    payload header; a v1 Array (spec repeated in the stype) is refused naming the version."""
    from fedlora.compression import CodecError
    from fedlora.wire import STYPE, decode_record, record_spec

    spec = "topk:0.5|affine:4|zstd"
    record = encode_record(toy(1), spec)
    arr = record["payload"]
    assert arr.stype == STYPE == "fedlora/v2"
    assert spec.encode() not in arr.stype.encode() and bytes(arr.data).count(spec.encode()) == 1
    assert record_spec(record) == spec
    assert set(decode_record(record, {k: v.shape for k, v in toy(1).items()})) == set(SHAPES)
    v1 = ArrayRecord({"payload": Array(dtype="uint8", shape=arr.shape, stype="fedlora/v1;" + spec,
                                       data=bytes(arr.data))})
    with pytest.raises(CodecError, match="wire version 'fedlora/v2'"):
        decode_record(v1)


def test_one_download_payload_sent_to_many_nodes_is_hashed_once(task_identity, monkeypatch):
    """configure_train gives every node with the same held copy the same payload object: its
    chunk ids are computed once (the hash of a 9 MB download per node was most of a 100-node
    round's configure_train), and they are the ids a fresh hash of an equal copy gives."""
    import hashlib
    from types import SimpleNamespace

    from fedlora import wire
    from fedlora.wire import message_bytes, payload_record

    calls = []  # fedlora's own chunk hashes (Flower's object ids use hashlib too)
    monkeypatch.setattr(wire, "hashlib", SimpleNamespace(
        sha256=lambda *a: calls.append(1) or hashlib.sha256(*a)))
    payload = parse_spec("fp32").encode(toy(4))
    msgs = [Message(RecordDict({ADAPTER_KEY: payload_record(payload)}),
                    message_type=MessageType.TRAIN, dst_node_id=n) for n in range(1, 6)]
    sizes = {message_bytes(m) for m in msgs}
    assert len(sizes) == 1 and len(calls) == 1
    copy = bytes(bytearray(payload))  # equal content, another object: hashed again, same ids
    other = Message(RecordDict({ADAPTER_KEY: payload_record(copy)}),
                    message_type=MessageType.TRAIN, dst_node_id=9)
    assert message_bytes(other) in sizes and len(calls) == 2
    ids = [[i for i, _ in m.content.array_records[ADAPTER_KEY]["payload"].slice_array()]
           for m in (msgs[0], msgs[-1], other)]
    assert ids[0] == ids[1] == ids[2]


@pytest.mark.parametrize("chunk", [None, 1 << 16])
def test_message_bytes_equals_flowers_own_object_tree(task_identity, monkeypatch, chunk):
    """wire.message_bytes (chunk ids hashed once, straight from the data; a chunk's size from
    its head and length) = the size of every unique object Flower's get_all_nested_objects
    collects, and the chunks it primes are Flower's own (same ids, same order), for small,
    multi-chunk and repeated-chunk payloads (Flower's 5 MB chunks, and 64 KiB ones so that a
    2.4 MB payload of zeros is 37 chunks of which 36 are one object); ``hashed=False`` (a
    received reply) gives the same count without hashing a chunk or priming the Array."""
    import flwr.app.message.array as flower_array
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedlora import wire
    from fedlora.wire import message_bytes

    if chunk is not None:
        monkeypatch.setattr(flower_array, "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", chunk)
        monkeypatch.setattr(wire, "MAX_CHUNK", chunk)
    zeros = OrderedDict([("w", np.zeros((600, 1000), np.float32))])   # identical chunks
    big = OrderedDict([("w", np.random.default_rng(0).standard_normal((700, 900))
                        .astype(np.float32))])
    for tensors, spec in ((toy(0), "affine:4"), (zeros, "fp32"), (big, "fp32"),
                          (big, "topk:0.1|affine:4|zstd")):
        msg = reply_to(Message(RecordDict({"config": ConfigRecord({"a": 1})}),
                               message_type=MessageType.TRAIN, dst_node_id=3), tensors, 7,
                       spec=spec)
        fresh = reply_to(Message(RecordDict({"config": ConfigRecord({"a": 1})}),
                                 message_type=MessageType.TRAIN, dst_node_id=3), tensors, 7,
                         spec=spec)
        received = reply_to(Message(RecordDict({"config": ConfigRecord({"a": 1})}),
                                    message_type=MessageType.TRAIN, dst_node_id=3), tensors, 7,
                            spec=spec)
        objects = get_all_nested_objects(fresh)
        flower = sum(len(o.deflate()) for o in objects.values())
        assert message_bytes(msg) == flower > 0
        # a received reply of one chunk is measured without hashing it; none is touched
        calls, real = [], wire._chunk_ids
        with monkeypatch.context() as m:
            m.setattr(wire, "_chunk_ids", lambda d: calls.append(1) or real(d))
            assert message_bytes(received, hashed=False) == flower
        data = received.content.array_records[ADAPTER_KEY]["payload"].data
        assert bool(calls) is (len(data) > wire.MAX_CHUNK)
        assert "_chunks" not in received.content.array_records[ADAPTER_KEY]["payload"].__dict__
        # two records holding equal payloads (other bytes objects): one Array object, as Flower
        twice = Message(RecordDict({"a": wire.payload_record(bytes(data)),
                                    "b": wire.payload_record(bytes(bytearray(data)))}),
                        message_type=MessageType.TRAIN, dst_node_id=3)
        assert message_bytes(twice, hashed=False) == sum(
            len(o.deflate()) for o in get_all_nested_objects(twice).values())
        ours = msg.content.array_records[ADAPTER_KEY]["payload"].slice_array()  # primed
        theirs = fresh.content.array_records[ADAPTER_KEY]["payload"].slice_array()
        assert [i for i, _ in ours] == [i for i, _ in theirs]
        assert [bytes(c.data) for _, c in ours] == [bytes(c.data) for _, c in theirs]
        if chunk is not None and spec == "fp32" and tensors is zeros:
            assert len(ours) > 30 and len({i for i, _ in ours}) == 3  # head, zeros, tail


def test_a_received_payload_named_many_times_is_hashed_once(task_identity, monkeypatch):
    """A node can name one payload under many keys for ~80 wire bytes each, and Flower's
    inflate gives every key its own Array over the same bytes: counting the reply hashes each
    data object once (nine distinct payloads interleaved 20 times: 9 hashes, not 180, so
    the 8-entry id cache is not what bounds it), and the count is Flower's own."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from fedlora import wire

    rng = np.random.default_rng(3)
    arrays = [Array(dtype="uint8", shape=(1024,), stype="x", data=rng.bytes(1024))
              for _ in range(9)]
    rec = ArrayRecord()
    for r in range(20):
        for i, a in enumerate(arrays):
            rec[f"k{r}_{i}"] = a
    sent = Message(RecordDict({ADAPTER_KEY: rec}), message_type=MessageType.TRAIN,
                   dst_node_id=3)
    contents = {k: o.deflate() for k, o in get_all_nested_objects(sent).items()}
    flower = sum(len(c) for c in contents.values())
    received = inflate_object_from_contents(sent.object_id, contents)  # (consumes contents)
    calls, real = [], wire._chunk_ids
    monkeypatch.setattr(wire, "_chunk_ids", lambda d: calls.append(1) or real(d))
    wire._IDS.clear()
    assert wire.message_bytes(received, hashed=False) == flower
    assert len(calls) == 9


@pytest.mark.parametrize("spec,saved", [("fp32", 5), ("topk:0.02|affine:4|zstd", 25)])
def test_wire_v2_saves_the_repeated_spec_bytes(task_identity, spec, saved):
    """What the v1 footnote of the reports says: a v1 message (spec also in the stype) is 5
    bytes larger for fp32 and 25 for topk:0.02|affine:4|zstd; nothing else differs."""
    from fedlora.compression import parse_spec
    from fedlora.wire import message_bytes, payload_record

    payload = parse_spec(spec).encode(toy(3))
    v1 = ArrayRecord({"payload": Array(dtype="uint8", shape=(len(payload),),
                                       stype="fedlora/v1;" + spec, data=payload)})
    sizes = [message_bytes(Message(RecordDict({ADAPTER_KEY: r}), message_type=MessageType.TRAIN,
                                   dst_node_id=1)) for r in (v1, payload_record(payload))]
    assert sizes[0] - sizes[1] == saved
