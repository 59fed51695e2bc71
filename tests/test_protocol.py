"""The round protocol's one module (``fedlora/strategies/protocol.py``, docs/architecture.md
"What crosses the wire").

Proves: every field of the train instruction and of the reply survives the trip to Flower's
record and back; the records keep the keys, value types and order the messages have always had
(so the wire bytes do not change); a reply with a missing or malformed field is refused with the
reasons the server has always recorded; and no wire key is spelled anywhere else in ``fedlora``.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, MetricRecord

from fedlora.strategies import protocol
from fedlora.strategies.protocol import (DownInstruction, DPInstruction, MalformedReply,
                                         SecAggInstruction, TrainInstruction, TrainReply)

ROOT = Path(__file__).resolve().parent.parent / "fedlora"

FULL = TrainInstruction(
    server_round=7, method="hetlora", codec_down="ranks|affine:8", codec_up="affine:4|zstd",
    tier=2, upload="delta", codec_key_id=3, base_fingerprint="ab" * 16,
    dp=DPInstruction("central", "laplace", 0.5, 1.25),
    down=DownInstruction("delta", "01" * 16, "23" * 16, True), rank_budget=4,
    hetlora_gamma=0.9, flasc_freeze="client",
    secagg=SecAggInstruction(b"\x00routed\xff", 1, 1234, 0.5, 99, union=True))


def test_every_instruction_field_round_trips_through_a_config_record():
    """Every field set (none left at its default) comes back equal from the ConfigRecord, and
    a record that leaves the optional fields out comes back with them None / default."""
    for name in (f.name for f in dataclasses.fields(TrainInstruction)):
        assert getattr(FULL, name) != getattr(TrainInstruction(), name), name
    rec = FULL.to_config()
    assert isinstance(rec, ConfigRecord)
    assert TrainInstruction.from_config(rec) == FULL
    plain = TrainInstruction(server_round=1, method="fedavg", codec_up="fp32")
    assert TrainInstruction.from_config(plain.to_config()) == plain
    assert set(plain.entries()) == {"server-round", "method", "codec-down", "codec-up", "tier",
                                    "upload", "down-mode"}


def test_instruction_keys_types_and_order_are_the_wire_format():
    """The record's keys in the order configure_train has always written them (base config,
    DP, the round's own entries, the download's, the method's, secure aggregation's), with the
    value types it always had (ints stay ints, the clip a float): the message bytes depend on
    them. Every key in it is one of protocol.TRAIN_KEYS."""
    e = FULL.entries()
    assert list(e) == ["base-fingerprint", "dp", "dp-mechanism", "dp-clip",
                       "dp-noise-multiplier", "server-round", "method", "codec-down",
                       "codec-up", "codec-key-id", "tier", "upload", "down-mode", "down-base",
                       "down-digest", "down-from-init", "rank-budget", "hetlora-gamma",
                       "flasc-freeze", "secagg-routed", "secagg-index", "secagg-union", "secagg-total",
                       "secagg-density", "secagg-coords-seed"]
    assert set(e) == set(protocol.TRAIN_KEYS)
    assert [type(e[k]) for k in ("server-round", "tier", "codec-key-id", "dp-clip",
                                 "down-from-init", "rank-budget", "hetlora-gamma")] == \
        [int, int, int, float, bool, int, float]


def test_every_reply_field_round_trips_through_a_metric_record():
    """A reply with every field set comes back equal (values as floats, as the server keeps
    them); its record has the task's metrics first, then the protocol's, in the order the
    ClientApp has always written them; num-examples stays an int."""
    rep = TrainReply(12, {"train-loss": 0.25, "train-acc": 0.5}, params_up=100.0,
                     ranks_selected=3.0, rank=2.0, dp_clipped=1.0, payload_up=321)
    rec = rep.to_record()
    assert isinstance(rec, MetricRecord)
    assert list(rec.keys()) == ["train-loss", "train-acc", "ranks-selected", "params-up", "rank",
                                "dp-clipped", "num-examples", "payload-up"]
    assert set(rec.keys()) - {"train-loss", "train-acc"} == set(protocol.REPLY_KEYS)
    assert isinstance(rec["num-examples"], int) and isinstance(rec["payload-up"], int)
    back = TrainReply.from_record(rec)
    assert back == rep
    assert TrainReply.from_record(TrainReply(5).to_record()) == TrainReply(5)
    assert back.scalars() == {k: float(v) for k, v in rec.items()}


@pytest.mark.parametrize("metrics, why", [
    ({}, "num-examples must be a positive number, got None"),
    ({"num-examples": 0}, "num-examples must be a positive number, got 0"),
    ({"num-examples": -3}, "num-examples must be a positive number"),
    ({"num-examples": 2.5}, "num-examples must be an integer below 2\\*\\*53, got 2.5"),
    ({"num-examples": float(1 << 53)}, "integer below 2\\*\\*53"),
    ({"num-examples": float("nan")}, "positive number, got nan"),
    ({"num-examples": 5, "params-up": float("inf")}, "metric 'params-up' is not finite"),
    ({"num-examples": 5, "rank": [1.0, float("nan")]}, "metric 'rank' is not finite"),
    ({"num-examples": 5, **{f"m{i}": 1.0 for i in range(64)}}, "65 metrics in reply"),
    ({"num-examples": 5, "x" * 129: 1.0}, "metric name of 129 characters"),
])
def test_malformed_replies_are_refused_with_the_same_reasons(metrics, why):
    """A reply's MetricRecord missing num-examples or holding a malformed value is refused
    with the reason the server records (the texts the drop records have always carried)."""
    with pytest.raises(MalformedReply, match=why):
        TrainReply.from_record(MetricRecord(metrics))


def test_a_reply_is_refused_before_any_typed_field_is_trusted():
    """A bool, a string or a list is not a number; list values are checked but not kept (a
    typed field never holds one); unknown names go to ``metrics``."""
    with pytest.raises(MalformedReply, match="is not a number: bool"):
        TrainReply.from_record({"num-examples": 5, "rank": True})
    with pytest.raises(MalformedReply, match="is not a number: str"):
        TrainReply.from_record({"num-examples": 5, "params-up": "12"})
    rep = TrainReply.from_record(MetricRecord({"num-examples": 5, "rank": [1.0, 2.0],
                                               "other": 3}))
    assert rep.rank is None and rep.metrics == {"other": 3.0} and rep.num_examples == 5


# ------------------------------------------------------------------------------ one spelling
#: modules of another namespace where a name coincides with a wire key (decided, not missed):
#: run-config and node-config names (config.py, validate.py, presets.py), the round record's
#: and checkpoints' fields ("method", "dp"), a codec's own config ("rank")
OTHER_NAMESPACES = {
    "config.py": None, "validate.py": None, "presets.py": None,
    "checkpoint.py": {"method"}, "server_app.py": {"method"}, "strategies/base.py": {"method"},
    "privacy.py": {"dp"}, "compression/lowrank.py": {"rank"},
}


def _key_uses(tree: ast.AST):
    """String constants used as a mapping key: a dict display's key, a subscript, the first
    argument of get/pop/setdefault, the left of ``in``."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Dict):
            yield from (k for k in n.keys if k is not None)
        elif isinstance(n, ast.Subscript):
            yield n.slice
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and n.func.attr in ("get", "pop", "setdefault") and n.args):
            yield n.args[0]
        elif isinstance(n, ast.Compare) and any(isinstance(o, (ast.In, ast.NotIn))
                                                 for o in n.ops):
            yield n.left


def test_wire_keys_are_spelled_only_in_the_protocol_module():
    """No module of ``fedlora`` but protocol.py reads or writes a train message's or a reply's
    entry by its literal key (a methods' ``cr.config.get("rank-budget")`` would fail this);
    the exceptions are other namespaces whose names coincide (:data:`OTHER_NAMESPACES`)."""
    keys = set(protocol.TRAIN_KEYS) | set(protocol.REPLY_KEYS)
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "strategies/protocol.py":
            continue
        allowed = OTHER_NAMESPACES.get(rel, set())
        for c in _key_uses(ast.parse(path.read_text())):
            if (isinstance(c, ast.Constant) and c.value in keys
                    and allowed is not None and c.value not in allowed):
                found.append(f"{rel}:{c.lineno}: {c.value!r}")
    assert not found, "wire keys spelled outside protocol.py:\n" + "\n".join(found)


def test_the_launcher_check_imports_the_protocol_without_flower_or_torch():
    """validate.py (the launcher's config check) imports protocol.py; neither may pull in
    Flower, torch or numpy."""
    import subprocess
    import sys

    code = ("import sys, fedlora.validate, fedlora.strategies.protocol; "
            "print(sorted(m for m in ('flwr', 'torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT.parent, check=True)
    assert out.stdout.strip() == "[]"
