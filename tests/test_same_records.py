"""scripts/same_records.py ``runs``: the check that two runs of one configuration gave the same
records (issue 30) passes on equal runs and fails on any difference in accuracy, payload bytes
or a checkpoint array, while message bytes may differ by what Flower's random node ids add."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

from conftest import ROOT

spec = importlib.util.spec_from_file_location("same_records", ROOT / "scripts" / "same_records.py")
same_records = importlib.util.module_from_spec(spec)
spec.loader.exec_module(same_records)

RECORDS = [
    {"round": 0, "accuracy": 0.1, "loss": 2.3, "clients": 0, "payload_up": 0, "payload_down": 0},
    {"round": 1, "accuracy": 0.4, "loss": 1.7, "clients": 2, "payload_up": 900,
     "payload_down": 1000, "tiers": {"11": 0, "12": 0},
     "bytes_up_per_node": {"11": 480, "12": 470}, "bytes_down_per_node": {"11": 520, "12": 520},
     "train_metrics": {"train-loss": 0.5}},
]


def write(run_dir, records, weights):
    run_dir.mkdir(parents=True)
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    torch.save({"state_dict": OrderedDict(w=torch.from_numpy(weights)),
                "travelling": OrderedDict(w=weights), "meta": {}}, run_dir / "checkpoint.pt")
    return run_dir


def other_ids(records, extra_bytes):
    """The same run with other node ids (2 and 3 bytes longer messages)."""
    out = copy.deepcopy(records)
    r = out[1]
    r["tiers"] = {"9001": 0, "9002": 0}
    r["bytes_up_per_node"] = {"9001": 480 + extra_bytes, "9002": 470}
    r["bytes_down_per_node"] = {"9001": 520, "9002": 523}
    return out


@pytest.fixture
def weights():
    return np.random.default_rng(0).standard_normal(6).astype(np.float32)


def test_equal_runs_with_other_node_ids_are_the_same(tmp_path, weights, capsys):
    a = write(tmp_path / "a", RECORDS, weights)
    b = write(tmp_path / "b", other_ids(RECORDS, 2), weights)
    assert same_records.runs(a, b) == 0
    assert "SAME RECORDS" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["accuracy", "payload_up", "train_metrics", "bytes",
                                    "checkpoint"])
def test_any_difference_fails(tmp_path, weights, change, capsys):
    recs, w = other_ids(RECORDS, 0), weights.copy()
    if change == "accuracy":
        recs[1]["accuracy"] = 0.4000001
    elif change == "payload_up":
        recs[1]["payload_up"] += 1
    elif change == "train_metrics":
        recs[1]["train_metrics"] = {"train-loss": 0.5000001}
    elif change == "bytes":  # more than node ids can explain
        recs[1]["bytes_up_per_node"]["9001"] += 100
    else:
        w[3] = np.nextafter(w[3], np.float32(np.inf))
    a = write(tmp_path / "a", RECORDS, weights)
    b = write(tmp_path / "b", recs, w)
    assert same_records.runs(a, b) == 1
    assert "RECORDS DIFFER" in capsys.readouterr().out
