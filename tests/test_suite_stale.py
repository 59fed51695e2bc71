"""benchmarks/run.py skips a finished run only while it still is the suite's configuration: a
run whose recorded config differs in a key that changes what it computes is run again; where a
run read or wrote, and keys it never recorded (added to fedlora later), do not count."""

from __future__ import annotations

import json

from benchmarks.run import stale


def test_a_changed_configuration_makes_a_finished_run_stale(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"config": {
        "lr": 0.002, "num-server-rounds": 24, "data-dir": "/a", "run-name": "x"}}))
    same = {"lr": 2e-3, "num-server-rounds": 24, "data-dir": "/b", "run-name": "y",
            "min-partition-size": 10}                # not recorded then: not held against it
    assert stale(tmp_path, same) is None
    assert stale(tmp_path, {**same, "lr": 5e-3}) == "lr: 0.002 -> 0.005"
    assert "num-server-rounds: 24 -> 48" in stale(tmp_path, {**same, "num-server-rounds": 48})
    assert stale(tmp_path / "missing", same) is None
