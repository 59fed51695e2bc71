"""End to end through the real ``flwr run`` path: a simulation SuperLink started here, 2 simulated
clients, 2 rounds, tiny model on the committed Fashion-MNIST sample. Proves records are written,
accuracy is recorded every round, measured upload bytes of flocora vs fedavg match the expected
parameter ratio, and nothing is left running."""

from __future__ import annotations

import json
import subprocess

import pytest

from fedlora.launch import run_simulation
from fedlora.results import read_rounds

pytestmark = pytest.mark.slow

BASE = {
    "num-server-rounds": 2, "feature-maps": 16, "lora-rank": 8, "local-epochs": 1,
    "max-examples-per-client": 64, "batch-size": 32, "fraction-train": 1.0,
    "dataset": "npz", "partitioner": "iid",
}


def _flower_pids(marker: str) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if marker in line}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_dir):
    out = {}
    for method in ("flocora", "fedavg"):
        work = tmp_path_factory.mktemp(f"sim-{method}")
        res, run_dir = run_simulation({**BASE, "method": method, "data-dir": sample_dir},
                                      nodes=2, work_dir=work, timeout=600)
        assert res.returncode == 0, res.stdout[-4000:]
        assert not _flower_pids(str(work)), "a Flower process of this run is still alive"
        out[method] = (read_rounds(run_dir), json.loads((run_dir / "run.json").read_text()),
                       run_dir, res.stdout)
    return out


def test_records_have_every_round_with_accuracy(runs):
    for method, (rounds, _, run_dir, _) in runs.items():
        assert [r["round"] for r in rounds] == [0, 1, 2], method
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in rounds)
        assert all(r["clients"] == 2 and r["failures"] == 0 for r in rounds[1:])
        assert (run_dir / "rounds.csv").read_text().count("\n") == 4
        assert (run_dir / "summary.json").exists() and (run_dir / "checkpoint.pt").exists()
    assert (runs["flocora"][2] / "adapter" / "adapter_config.json").exists()


def test_measured_upload_ratio_matches_parameter_ratio(runs):
    fl_rounds, fl_meta, *_ = runs["flocora"]
    fa_rounds, fa_meta, *_ = runs["fedavg"]
    measured = sum(r["bytes_up"] for r in fa_rounds) / sum(r["bytes_up"] for r in fl_rounds)
    expected = fa_meta["params_travelling"] / fl_meta["params_travelling"]
    assert expected > 3
    assert measured == pytest.approx(expected, rel=0.05)
    # and the measured size is at least the raw fp32 payload (nothing is hidden)
    per_client = fl_rounds[1]["bytes_up"] / fl_rounds[1]["clients"]
    assert per_client >= 4 * fl_meta["params_travelling"]


def test_log_has_compact_round_lines(runs):
    assert "[fedlora] round   2" in runs["flocora"][3]
