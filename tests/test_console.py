"""What a run shows (issue 30, item 6): the per-round console row (accuracy and loss only for
evaluated rounds, an ETA), the run config as TensorBoard hparams read back from the event file
with TensorBoard's own reader, and ``analytic_bytes_up`` summed per tier from each tier's
``tier-codec-up``."""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedlora.config import RunConfig
from fedlora.results import Recorder, format_duration

from conftest import FakeGrid
from test_hostile import SHAPES, configure, honest, make, reply, toy

META = {"method": "flocora", "config": {"num-server-rounds": 4}}


def rows(tmp_path, records, caplog):
    rec = Recorder(tmp_path / "run", META, tensorboard=False)
    with caplog.at_level(logging.INFO, logger="flwr.fedlora"):
        for r in records:
            rec.log_round(r)
    return [m for m in caplog.messages if m.startswith("[fedlora] round")]


def test_rows_without_evaluation_omit_accuracy_and_loss(tmp_path, caplog):
    got = rows(tmp_path, [{"round": 0, "accuracy": 0.1, "loss": 2.3},
                          {"round": 1, "clients": 3, "bytes_down": 2_000_000},
                          {"round": 2, "accuracy": 0.5, "loss": 1.25, "clients": 3}], caplog)
    assert "| acc 0.1000 | loss 2.3000 |" in got[0]
    assert "acc" not in got[1] and "loss" not in got[1] and "nan" not in got[1]
    assert got[1].startswith("[fedlora] round   1 | clients 3 (failed 0, dropped 0) | down 2.000 MB")
    assert "| acc 0.5000 | loss 1.2500 |" in got[2]


def test_eta_is_the_mean_round_time_so_far_times_rounds_left(tmp_path):
    rec = Recorder(tmp_path / "run", META, tensorboard=False)
    rec.records = [{"round": 0, "wall_s": 5.0}, {"round": 1, "wall_s": 35.0},
                   {"round": 2, "wall_s": 75.0}]
    assert rec.eta_s() == pytest.approx((75.0 - 5.0) / 2 * 2)   # 35 s a round, 2 left
    line = rec.console_line({**rec.records[-1], "cum_mb": 1.0})
    assert line.endswith("| 75.0s | eta 1m10s")
    rec.records.append({"round": 4, "wall_s": 150.0})            # the last round: no ETA
    assert rec.eta_s() is None
    assert "eta" not in rec.console_line({**rec.records[-1], "cum_mb": 1.0})
    rec.records = rec.records[:1]                                 # one record: no pace yet
    assert rec.eta_s() is None
    assert Recorder(tmp_path / "r2", {}, tensorboard=False).eta_s() is None  # rounds unknown


def test_format_duration():
    assert [format_duration(s) for s in (0, 44.6, 60, 185, 3599, 7620)] == \
        ["0s", "45s", "1m00s", "3m05s", "59m59s", "2h07m"]


def test_run_config_is_written_as_tensorboard_hparams(tmp_path):
    """Read back with TensorBoard's EventAccumulator: the hparams plugin's session start holds
    every run-config key with its value (numbers as numbers, bools as 0/1, strings as strings);
    the experiment declares eval/accuracy and eval/loss as its metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = RunConfig(method="flasc", lr=0.05, codec_up="affine:4|zstd", num_server_rounds=7)
    config = cfg.as_dict()
    rec = Recorder(tmp_path / "run", {"method": "flasc", "config": config})
    rec.log_round({"round": 0, "accuracy": 0.1, "loss": 2.3})
    rec.finish({})
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw)
            for tag, raw in content.items()}
    start = next(d.session_start_info for d in data.values() if d.HasField("session_start_info"))
    got = {}
    for k, v in start.hparams.items():
        got[k] = v.string_value if v.WhichOneof("kind") == "string_value" else v.number_value
    assert set(got) == set(config)
    assert got["method"] == "flasc" and got["codec-up"] == "affine:4|zstd"
    assert got["lr"] == pytest.approx(0.05) and got["num-server-rounds"] == 7
    for k, v in config.items():
        if isinstance(v, bool):
            assert got[k] == float(v), k
        elif isinstance(v, (int, float)):
            assert got[k] == pytest.approx(v), k
        else:
            assert got[k] == ("" if v is None else str(v)), k
    exp = next(d.experiment for d in data.values() if d.HasField("experiment"))
    assert {m.name.tag for m in exp.metric_infos} == {"eval/accuracy", "eval/loss"}


class TierGrid(FakeGrid):
    """FakeGrid whose nodes answer the tier query with their tier."""

    def __init__(self, nodes, tiers):
        super().__init__(nodes)
        self.tiers = tiers

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            r = Message(RecordDict({"metrics": MetricRecord(
                {"tier": self.tiers[node], "partition-id": self.partition_of[node]})}),
                reply_to=m)
            r.metadata.__dict__["_src_node_id"] = node
            out.append(r)
        return out


def analytic_bytes(bits: int) -> float:
    """FLoCoRA's formula written out: 2-D tensors numel·b + 64 per row when b < 32, else
    32·numel; 1-D tensors 32·numel."""
    total = 0
    for shape in SHAPES.values():
        n = int(np.prod(shape))
        total += 32 * n if bits >= 32 or len(shape) == 1 else bits * n + 64 * shape[0]
    return total / 8


def test_analytic_bytes_up_sums_each_tiers_codec(task_identity):
    """Nodes of tier 0 upload fp32, tier 1 affine:4, tier 2 affine:2: the round's analytic size
    is the sum over the aggregated nodes of their tier's size; an untiered run keeps the
    per-reply size the ServerApp gives times the replies."""
    nodes, tiers = (1, 2, 3, 4), {1: 0, 2: 1, 3: 1, 4: 2}
    s = make("flocora", tier_codec_up="fp32,affine:4,affine:2")
    s.keep_records(None, analytic_bytes_per_upload=123.0)
    msgs = configure(s, 1, toy(0), nodes, TierGrid(list(nodes), tiers))
    assert [m.content["config"]["codec-up"] for m in msgs] == ["fp32", "affine:4", "affine:4",
                                                               "affine:2"]
    arrays, _ = s.aggregate_train(1, [reply(m, honest(s, m, 1, i)) for i, m in enumerate(msgs)])
    assert arrays is not None
    rec = s.round_record(1)
    want = analytic_bytes(32) + 2 * analytic_bytes(4) + analytic_bytes(2)
    assert rec["clients"] == 4 and rec["analytic_bytes_up"] == pytest.approx(want)
    assert analytic_bytes(32) > analytic_bytes(4) > analytic_bytes(2)  # each tier its own size

    plain = make("flocora", codec_up="affine:4")
    plain.keep_records(None, analytic_bytes_per_upload=analytic_bytes(4))
    msgs = configure(plain, 1, toy(0), nodes)
    plain.aggregate_train(1, [reply(m, honest(plain, m, 1, i)) for i, m in enumerate(msgs)])
    assert plain.round_record(1)["analytic_bytes_up"] == 4 * analytic_bytes(4)


def test_analytic_bytes_up_counts_only_aggregated_nodes(task_identity):
    """A dropped reply costs nothing analytic (as the untiered clients × size)."""
    nodes, tiers = (1, 2, 3), {1: 0, 2: 1, 3: 1}
    s = make("flocora", tier_codec_up="fp32,affine:4")
    s.keep_records(None, analytic_bytes_per_upload=0.0)
    msgs = configure(s, 1, toy(0), nodes, TierGrid(list(nodes), tiers))
    bad = reply(msgs[0], OrderedDict((k, np.zeros(v, np.float32)) for k, v in SHAPES.items()),
                spec="affine:8")                        # not the codec asked of it: dropped
    s.aggregate_train(1, [bad] + [reply(m, honest(s, m, 1, i)) for i, m in
                                  enumerate(msgs[1:])])
    rec = s.round_record(1)
    assert rec["dropped"] == 1 and rec["clients"] == 2
    assert rec["analytic_bytes_up"] == pytest.approx(2 * analytic_bytes(4))
