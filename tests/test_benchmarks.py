"""The benchmark harness end to end on the CI-sized suite: real simulations, a report with one
row per configuration, the plot, and resume (a second call reruns nothing)."""

from __future__ import annotations

import pytest

from benchmarks.report import summarize
from benchmarks.run import run_suite
from benchmarks.suites import SUITES

pytestmark = pytest.mark.slow


def test_vision_quick_suite_runs_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "vision-quick"
    run_suite("vision-quick", out)
    spec = SUITES["vision-quick"]()
    rows = {r["name"]: r for r in summarize(out, spec)}
    assert set(rows) == set(spec["runs"])
    assert all(r["rounds"] == 2 for r in rows.values())
    # fedavg is the reference; LoRA adapters and 4-bit uploads move fewer bytes
    assert rows["fedavg"]["ratio_vs_fedavg"] == pytest.approx(1.0)
    assert rows["flocora-fp32"]["ratio_vs_fedavg"] > 1.5
    assert rows["flocora-affine4"]["mb_up"] < 0.4 * rows["flocora-fp32"]["mb_up"]  # tiny: headers count
    table = (out / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in spec["runs"])
    assert (out / "accuracy_vs_mb.png").stat().st_size > 10_000
    capsys.readouterr()
    run_suite("vision-quick", out)                 # resume: everything is complete
    assert capsys.readouterr().out.count("complete, skipped") == len(spec["runs"])
