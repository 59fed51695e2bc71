"""``./run``'s presets (fedlora/presets.py): ``--preset`` starts from one and overrides win;
the main job's closing line compares its measured bytes with the committed references only
when the run is the preset itself."""

from __future__ import annotations

import argparse
import json

import pytest

from fedlora import launch
from fedlora.presets import MAIN, PRESETS, compare_main


def _args(tmp_path, *overrides, preset="main"):
    return argparse.Namespace(
        cmd="sim", nodes=10, cpus_per_node=1, gpus_per_node=0, work_dir=str(tmp_path / "w"),
        resume=None, preset=preset, overrides=list(overrides))


def test_preset_is_the_base_and_overrides_win(tmp_path):
    rc, _ = launch.prepare(_args(tmp_path, "lora-rank=8", f'run-dir="{tmp_path}"'), light=True)
    assert rc["lora-rank"] == 8 and rc["codec-up"] == MAIN["codec-up"]
    assert all(rc[k] == v for k, v in MAIN.items() if k != "lora-rank")
    assert set(launch.PRESET_NAMES) == set(PRESETS)


def _run(d, total_mb, acc, config):
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"total_mb": total_mb, "final_accuracy": acc}))
    (d / "run.json").write_text(json.dumps({"config": config}))


def test_compare_main_reads_the_committed_references(tmp_path):
    refs = tmp_path / "refs"
    _run(refs / "runs" / "lora-dense-fp32", 80.0, 0.95, {})
    _run(refs / "runs" / "full-ft-fp32", 10900.0, 0.96, {})
    _run(tmp_path / "mine", 4.0, 0.9484, {**MAIN, "run-name": "x", "run-dir": "/r"})
    line = compare_main(tmp_path / "mine", refs)
    assert "this run 4.00 MB" in line and "dense fp32 LoRA 80.0 MB = 20x more" in line
    assert "full fine-tuning (FedAvg, fp32) 10900.0 MB = 2725x more" in line
    _run(tmp_path / "other", 4.0, 0.9, {**MAIN, "lora-rank": 8})
    assert "no measured reference" in compare_main(tmp_path / "other", refs)
    (refs / "runs" / "full-ft-fp32" / "summary.json").unlink()
    assert "full fine-tuning (FedAvg, fp32): not committed" in compare_main(tmp_path / "mine",
                                                                            refs)


def test_a_fractional_cpus_per_node_is_refused_in_one_line(tmp_path):
    """Flower 1.41's client-resources-num-cpus is an integer >= 1: the launcher refuses 0.5 (a
    Namespace as a caller builds it) and 0 in one line naming the flag, before any process
    starts, and its parser refuses a non-integer with exit status 2."""
    bad = _args(tmp_path, f'run-dir="{tmp_path}"')
    for v in (0.5, 0):
        bad.cpus_per_node = v
        with pytest.raises(ValueError, match=r"^--cpus-per-node must be an integer >= 1") as e:
            launch.prepare(bad, light=True)
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        launch.main(["sim", "--cpus-per-node", "0.5"])
    assert e.value.code == 2
