"""Recorder's TensorBoard events: what a run writes under ``<run>/tb/`` reads back as the records.

The event files are read with TensorBoard's own reader (EventAccumulator), so these tests prove
that ``tensorboard --logdir runs`` sees the same numbers as ``rounds.jsonl``.
"""

from __future__ import annotations

import logging
import time

import pytest

from fedlora.results import Recorder, TensorBoardLog, read_rounds

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

# Three rounds from two tiers; node "7" has no tier entry for its upload (counted as "unknown").
RECORDS = [
    {"round": 0, "accuracy": 0.1, "loss": 2.30, "clients": 0, "failures": 0, "dropped": 0,
     "bytes_down": 0, "bytes_up": 0, "control_bytes": 1234, "tiers": {},
     "bytes_down_per_node": {}, "bytes_up_per_node": {}},
    {"round": 1, "accuracy": 0.42, "loss": 1.70, "clients": 3, "failures": 1, "dropped": 1,
     "bytes_down": 3_000_000 + 2_500_123, "bytes_up": 700_001 + 650_000 + 40_000,
     "control_bytes": 500, "tiers": {"11": 0, "12": 1, "13": 1},
     "bytes_down_per_node": {"11": 3_000_000, "12": 1_500_000, "13": 1_000_123},
     "bytes_up_per_node": {"11": 700_001, "12": 650_000, "7": 40_000},
     "partitions": [0, 3, 5], "failure_reasons": {"13": "boom"}, "train_metrics": {"x": 1.0}},
    {"round": 2, "accuracy": 0.55, "loss": 1.20, "clients": 2, "failures": 0, "dropped": 0,
     "bytes_down": 4_000_000, "bytes_up": 1_300_000, "control_bytes": 0,
     "tiers": {"11": 0, "14": 2},
     "bytes_down_per_node": {"11": 2_000_000, "14": 2_000_000},
     "bytes_up_per_node": {"11": 800_000, "14": 500_000},
     "round_s": 12.5, "new_metric": 7},  # a key no code knows about yet
]


def _load(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={SCALARS: 0})
    acc.Reload()
    return acc


def _series(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture()
def run(tmp_path):
    rec = Recorder(tmp_path / "run", {"method": "flocora", "config": {"seed": 1}})
    written = [rec.log_round(r) for r in RECORDS]
    rec.finish({"method": "flocora"})
    return tmp_path / "run", written


def test_events_are_written_beside_rounds_jsonl(run):
    run_dir, written = run
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "no event file in <run>/tb/"
    assert [r["round"] for r in read_rounds(run_dir)] == [0, 1, 2]


def test_scalars_read_back_equal_the_records(run):
    run_dir, written = run
    acc = _load(run_dir)
    want = {
        "eval/accuracy": "accuracy", "eval/loss": "loss",
        "bytes/down": "bytes_down", "bytes/up": "bytes_up", "bytes/control": "control_bytes",
        "cum_mb/total": "cum_mb", "cum_mb/down": "cum_mb_down", "cum_mb/up": "cum_mb_up",
        "cum_mb/control": "cum_mb_control",
        "nodes/failures": "failures", "nodes/dropped": "dropped", "nodes/clients": "clients",
    }
    for tag, key in want.items():
        got = _series(acc, tag)
        assert got == pytest.approx({r["round"]: r[key] for r in written}, rel=1e-6), tag
    # cum MB is the running sum of all three directions, as in rounds.jsonl
    total = sum(r["bytes_down"] + r["bytes_up"] + r["control_bytes"] for r in RECORDS)
    assert _series(acc, "cum_mb/total")[2] == pytest.approx(total / 1e6, rel=1e-6)


def test_per_tier_bytes_are_sums_of_per_node_bytes_by_tier(run):
    run_dir, _ = run
    acc = _load(run_dir)
    tags = set(acc.Tags()["scalars"])
    assert _series(acc, "tier_bytes/down/tier_0") == {1: 3_000_000, 2: 2_000_000}
    assert _series(acc, "tier_bytes/down/tier_1") == {1: 2_500_123}
    assert _series(acc, "tier_bytes/down/tier_2") == {2: 2_000_000}
    assert _series(acc, "tier_bytes/up/tier_0") == {1: 700_001, 2: 800_000}
    assert _series(acc, "tier_bytes/up/tier_1") == {1: 650_000}
    assert _series(acc, "tier_bytes/up/tier_unknown") == {1: 40_000}
    assert _series(acc, "tier_bytes/up/tier_2") == {2: 500_000}
    # and per round, the tiers add up to the round's totals
    for r in RECORDS[1:]:
        for d in ("down", "up"):
            parts = [t for t in tags if t.startswith(f"tier_bytes/{d}/")]
            s = sum(_series(acc, t).get(r["round"], 0) for t in parts)
            assert s == r[f"bytes_{d}"], (r["round"], d)


def test_accuracy_against_cumulative_kb(run):
    run_dir, written = run
    got = _series(_load(run_dir), "accuracy_vs_kb/accuracy")
    cum = 0
    want = {}
    for r in RECORDS:
        cum += r["bytes_down"] + r["bytes_up"] + r["control_bytes"]
        want[cum // 1000] = r["accuracy"]
    assert sorted(got) == sorted(want) == [1, 6891, 12191]
    assert got == pytest.approx(want, rel=1e-6)


def test_every_numeric_key_appears_under_exactly_one_per_round_tag(run):
    """Keys with a named tag (eval/accuracy, bytes/down, ...) are there only; every other number
    goes under round/<key>: accuracy is not also round/accuracy (issue 30)."""
    run_dir, written = run
    acc = _load(run_dir)
    tags = set(acc.Tags()["scalars"])
    assert _series(acc, "round/new_metric") == {2: 7}
    assert _series(acc, "round/round_s") == {2: 12.5}
    for r in written:  # every top-level number of every record, including Recorder's own keys
        for k, v in r.items():
            if k != "round" and isinstance(v, (int, float)):
                tag = TensorBoardLog.NAMED.get(k, f"round/{k}")
                assert tag in tags, k
                assert _series(acc, tag)[r["round"]] == pytest.approx(v, rel=1e-6)
    for k in TensorBoardLog.NAMED:
        assert f"round/{k}" not in tags, k
    per_round = [t for t in tags if not t.startswith("accuracy_vs_kb/")]
    assert [t for t in per_round if t.endswith("accuracy")] == ["eval/accuracy"]
    # dicts and lists are not scalars
    for k in ("round/tiers", "round/partitions", "round/train_metrics", "round/round"):
        assert k not in tags


def test_run_dir_reused_starts_tb_over(tmp_path):
    for n in (3, 1):
        rec = Recorder(tmp_path / "run", {})
        for r in RECORDS[:n]:
            rec.log_round(r)
        rec.finish({})
    acc = _load(tmp_path / "run")
    assert sorted(_series(acc, "eval/accuracy")) == [0]


def test_events_are_on_disk_when_log_round_returns(tmp_path, monkeypatch):
    """A run killed mid-way keeps every logged round in tb/, even with a slow disk: the writer
    queues events for a background thread, so without a flush per round they would lag."""
    from tensorboard.summary.writer import record_writer
    real_write = record_writer.RecordWriter.write

    def slow_write(self, data):
        time.sleep(0.01)
        real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", slow_write)
    rec = Recorder(tmp_path / "run", {})
    rec.log_round(RECORDS[0])
    rec.log_round(RECORDS[1])
    acc = _load(tmp_path / "run")
    assert sorted(_series(acc, "eval/accuracy")) == [0, 1]
    assert sorted(_series(acc, "round/wall_s")) == [0, 1]  # the last tag of round 1 too
    rec.finish({})


def test_missing_tensorboard_warns_once_and_run_goes_on(tmp_path, monkeypatch, caplog):
    import builtins
    real_import = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    with caplog.at_level(logging.WARNING, logger="flwr.fedlora"):
        rec = Recorder(tmp_path / "run", {})
        for r in RECORDS:
            rec.log_round(r)
        summary = rec.finish({})
    warnings = [m for m in caplog.messages if "TensorBoard" in m]
    assert len(warnings) == 1, warnings
    assert summary["rounds"] == 2 and len(read_rounds(tmp_path / "run")) == 3
    assert not list((tmp_path / "run").glob("tb/events.out.tfevents.*"))


def test_write_error_stops_tensorboard_not_the_run(tmp_path, caplog):
    rec = Recorder(tmp_path / "run", {})

    class Broken:
        def add_scalar(self, *a, **k):
            raise OSError("disk full")

        def close(self):
            pass

    rec._tb._w = Broken()
    with caplog.at_level(logging.WARNING, logger="flwr.fedlora"):
        for r in RECORDS:
            rec.log_round(r)
        rec.finish({})
    assert len([m for m in caplog.messages if "disk full" in m]) == 1
    assert len(read_rounds(tmp_path / "run")) == 3


def test_non_numbers_and_bools():
    rows = TensorBoardLog.scalars({"round": 4, "accuracy": "n/a", "flag": True, "x": None,
                                   "cum_mb": float("nan")})
    tags = {t for t, _, _ in rows}
    assert "eval/accuracy" not in tags and "round/x" not in tags
    assert ("round/flag", 1.0, 4) in rows
    assert not any(t.startswith("accuracy_vs_kb") for t in tags)


def test_kb_step_is_exact_for_whole_kb():
    """1 001 000 bytes is KB step 1001; float math on MB (1.001 * 1000 = 1000.999...) would say 1000."""
    rows = TensorBoardLog.scalars({"round": 1, "accuracy": 0.5, "cum_mb": 1_001_000 / 1e6})
    assert [s for t, _, s in rows if t == "accuracy_vs_kb/accuracy"] == [1001]


# ------------------------------------------------------------------ progress of a benchmark run


def _watch(run_dir, **kw) -> None:
    """One pass of benchmarks.run._progress over a finished run (stop already set)."""
    import threading

    from benchmarks.run import _progress

    stop = threading.Event()
    stop.set()
    _progress(run_dir, "flasc-d0.25", 3, stop, time.time() - 75, **kw)


def test_progress_prints_plain_lines_when_stdout_is_not_a_tty(tmp_path, capsys):
    """config i/N, round r/R, accuracy, cum MB, elapsed, and ETA = seconds per round so far
    (30 s from the records' wall_s) x rounds left (1), less the 20 s since the last record."""
    import json
    import os
    import re

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recs = [{"round": r, "accuracy": a, "cum_mb": mb, "wall_s": w}
            for r, a, mb, w in [(0, 0.1, 0.0, 10.0), (1, 0.4, 1.25, 40.0), (2, 0.55, 2.5, 70.0)]]
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    t = time.time() - 20
    os.utime(run_dir / "rounds.jsonl", (t, t))
    _watch(run_dir, config=(2, 5))
    out = capsys.readouterr().out
    assert "\x1b[" not in out, "terminal codes in a log file"
    assert len(out.splitlines()) == 1, out
    assert re.fullmatch(r"  \[2/5 flasc-d0\.25\] round 2/3 acc 0\.5500 2\.50 MB 1:1[56] "
                        r"ETA 0:(09|10)\n", out), out


def test_progress_line_fits_80_columns_with_a_long_name(tmp_path, capsys):
    """A suite's long configuration name is cut in the middle so the line stays within 80
    columns, keeping its start and end; a round without evaluation shows the last accuracy."""
    import json
    import threading

    from benchmarks.run import _progress

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recs = [{"round": 0, "accuracy": 0.1, "cum_mb": 0.0, "wall_s": 10.0},
            {"round": 24, "accuracy": 0.5123, "cum_mb": 9876.5, "wall_s": 4000.0},
            {"round": 25, "cum_mb": 12345.25, "wall_s": 4170.0}]
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    stop = threading.Event()
    stop.set()
    name = "dp-text/lora-a2-local-no-clip-noise-multiplier-0.5/seed3"
    _progress(run_dir, name, 100, stop, time.time() - 4300, config=(12, 48))
    line = capsys.readouterr().out.rstrip("\n")
    assert len(line) <= 80, (len(line), line)
    assert line.startswith("  [12/48 dp-te") and "…" in line and "seed3] round 25/100" in line
    assert "acc 0.5123 12345.25 MB 1:11:" in line and " ETA " in line


def test_progress_draws_a_bar_on_a_terminal(run, capsys, monkeypatch):
    run_dir, written = run
    monkeypatch.setattr(type(__import__("sys").stdout), "isatty", lambda self: True)
    monkeypatch.setenv("COLUMNS", "80")
    _watch(run_dir, config=(2, 5))
    out = capsys.readouterr().out
    assert "\x1b[" in out  # rich's live display, not plain lines
    for part in ("2/5 flasc-d0.25", "2/3 acc 0.5500", f"{written[-1]['cum_mb']:.2f} MB",
                 " 1:1", "ETA "):
        assert part in out, part
    import re
    visible = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out)
    assert max(len(line) for line in visible.splitlines()) <= 80
