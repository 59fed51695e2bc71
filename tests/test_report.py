"""The frontier report on synthetic records: mean ± std over seeds, ratio and Δ vs FedAvg, MB to
reach FedAvg's final accuracy − 1 point, the Pareto front, summary.json, unfinished runs left out,
and the README block rewrite."""

from __future__ import annotations

import json

import pytest

from benchmarks.report import summarize, update_readme, write_report


def _write(run_dir, accs, mb_per_round, rounds=4, wire="fedlora/v2"):
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"wire": wire} if wire else {}))
    recs, cum = [], 0.0
    for r in range(rounds + 1):
        cum += mb_per_round if r else 0.0
        rec = {"round": r, "cum_mb": cum, "cum_mb_down": cum / 2, "cum_mb_up": cum / 2,
               "cum_mb_control": 0.0, "wall_s": 10.0 * r}
        if r in accs:
            rec["accuracy"] = accs[r]
        recs.append(rec)
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    (run_dir / "summary.json").write_text("{}")


SPEC = {"seeds": [1, 2], "target": 0.8, "runs": {
    "fedavg": {"method": "fedavg", "num-server-rounds": 4},
    "small": {"method": "flocora", "num-server-rounds": 4, "lora-rank": 4,
              "codec-up": "affine:4", "download": "delta", "codec-down": "affine:4"},
    "bad": {"method": "flocora", "num-server-rounds": 4},
    "unfinished": {"method": "flocora", "num-server-rounds": 4}}}


@pytest.fixture
def suite(tmp_path):
    out = tmp_path / "s"
    runs = out / "runs"
    _write(runs / "fedavg/seed-1", {0: 0.1, 2: 0.80, 4: 0.90}, 10.0)
    _write(runs / "fedavg/seed-2", {0: 0.1, 2: 0.85, 4: 0.92}, 10.0)
    _write(runs / "small/seed-1", {0: 0.1, 2: 0.70, 4: 0.895}, 0.2)
    _write(runs / "small/seed-2", {0: 0.1, 2: 0.90, 4: 0.905}, 0.2)
    _write(runs / "bad/seed-1", {0: 0.1, 4: 0.50}, 1.0)
    _write(runs / "bad/seed-2", {0: 0.1, 4: 0.60}, 1.0)
    _write(runs / "unfinished/seed-1", {0: 0.1, 2: 0.5}, 1.0, rounds=2)  # stopped at round 2
    return out


def test_frontier_numbers(suite):
    rows = {r["name"]: r for r in summarize(suite, SPEC)}
    assert set(rows) == {"fedavg", "small", "bad"}           # unfinished runs are not reported
    fa, sm, bad = rows["fedavg"], rows["small"], rows["bad"]
    assert fa["final_mean"] == pytest.approx(0.91) and fa["final_std"] == pytest.approx(0.01)
    assert sm["ratio_vs_fedavg"] == pytest.approx(50.0)       # 40 MB / 0.8 MB
    assert sm["delta_vs_fedavg"] == pytest.approx(-0.01)
    assert sm["within_1pt"] and not bad["within_1pt"]
    # FedAvg's final mean − 1 point = 0.90: small reaches it at round 2 (seed 2) only
    assert sm["mb_to_fedavg_minus_1pt"] == pytest.approx(0.4) and sm["seeds_reaching"] == 1
    assert fa["mb_to_fedavg_minus_1pt"] == pytest.approx(40.0) and fa["seeds_reaching"] == 2
    assert fa["pareto"] and sm["pareto"] and not bad["pareto"]


def test_summary_json_and_readme(suite, tmp_path):
    write_report("s", suite, SPEC)
    summary = json.loads((suite / "summary.json").read_text())
    row = next(c for c in summary["configurations"] if c["name"] == "small")
    assert row["ratio_vs_fedavg"] == pytest.approx(50.0) and row["seeds_done"] == 2
    assert row["codecs"] == "Δ affine:4 / affine:4"
    table = (suite / "summary.md").read_text()
    assert "| small | flocora |" in table and "unfinished" not in table
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:s -->\nold\n<!-- /results:s -->\nafter\n")
    assert update_readme("s", suite.parent, readme)
    text = readme.read_text()
    assert "old" not in text and "| small | flocora |" in text and text.endswith("after\n")


def test_runs_measured_with_wire_v1_are_marked(suite):
    """A run.json without ``wire`` (runs made before wire v2) marks its configuration with †
    and the footnote; v2 runs are not marked."""
    (suite / "runs/bad/seed-2/run.json").write_text("{}")
    rows = {r["name"]: r for r in write_report("s", suite, SPEC)}
    assert rows["bad"]["wire"] == ["fedlora/v1", "fedlora/v2"]
    assert rows["small"]["wire"] == ["fedlora/v2"]
    table = (suite / "summary.md").read_text()
    assert "| bad † | flocora |" in table and "| small | flocora |" in table
    assert "wire v1" in table


def test_runs_with_spelled_out_tensor_tables_are_marked_where_formats_mix(suite):
    """Runs whose run.json config has no ``payload-table`` (before the digest format) are
    ``names``; where a table mixes them with ``digest`` runs, they carry ‡ and the footnote."""
    write_report("s", suite, SPEC)
    assert "‡" not in (suite / "summary.md").read_text()  # all format 1: nothing to tell apart
    for seed in (1, 2):
        (suite / f"runs/small/seed-{seed}/run.json").write_text(json.dumps(
            {"wire": "fedlora/v2", "config": {"payload-table": "digest"}}))
    rows = {r["name"]: r for r in write_report("s", suite, SPEC)}
    assert rows["small"]["tables"] == ["digest"] and rows["bad"]["tables"] == ["names"]
    table = (suite / "summary.md").read_text()
    assert "| bad ‡ | flocora |" in table and "| small | flocora |" in table
    assert "payload format 1" in table


def test_each_configuration_against_its_own_baseline(suite):
    """A suite with ``baselines`` (text-conv: every method against FL+LoRA at the same
    heterogeneity and budget) compares each row with its baseline, draws the front among the
    rows sharing a baseline, and leaves the FedAvg columns empty."""
    spec = {**SPEC, "baselines": {"fedavg": "fedavg", "small": "fedavg", "bad": "bad"}}
    rows = {r["name"]: r for r in summarize(suite, spec)}
    sm, bad = rows["small"], rows["bad"]
    assert sm["baseline"] == "fedavg" and sm["ratio"] == pytest.approx(50.0)
    assert sm["delta"] == pytest.approx(-0.01) and sm["mb_to_base_minus_1pt"] == pytest.approx(0.4)
    assert bad["ratio"] == pytest.approx(1.0) and bad["delta"] == 0.0
    assert bad["pareto"]  # alone against its own baseline, though FedAvg-small dominate it
    assert not any(r["pareto"] for r in summarize(suite, SPEC) if r["name"] == "bad")
    assert all(r["ratio_vs_fedavg"] is None and r["delta_vs_fedavg"] is None
               for r in rows.values())
    out = write_report("t", suite, spec)
    text = (suite / "summary.md").read_text()
    assert "| baseline |" in text and "| fedavg | 50.0x | -1.00 |" in text
    assert len(out) == 3


def test_a_rounds_by_epochs_column_appears_only_where_schedules_differ(suite):
    write_report("s", suite, SPEC)
    assert "rounds × epochs" not in (suite / "summary.md").read_text()
    spec = {**SPEC, "runs": {**SPEC["runs"], "small": {**SPEC["runs"]["small"],
                                                       "local-epochs": 3}}}
    write_report("s", suite, spec)
    table = (suite / "summary.md").read_text()
    assert "| rounds × epochs |" in table
    assert "| small | flocora | `Δ affine:4 / affine:4` | 4 | 4×3 |" in table
    assert "| bad | flocora | `fp32 / fp32` | – | 4×1 |" in table


def test_an_epsilon_column_where_runs_spent_a_privacy_budget(suite):
    """Runs whose last record carries ``dp_epsilon`` report it (the largest over seeds); other
    rows show –; suites without DP have no such column."""
    write_report("s", suite, SPEC)
    assert "| ε |" not in (suite / "summary.md").read_text()
    for seed, eps in ((1, 7.9), (2, 8.0)):
        path = suite / f"runs/small/seed-{seed}/rounds.jsonl"
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        recs[-1]["dp_epsilon"] = eps
        path.write_text("".join(json.dumps(x) + "\n" for x in recs))
    rows = {r["name"]: r for r in write_report("s", suite, SPEC)}
    assert rows["small"]["epsilon"] == 8.0 and rows["bad"]["epsilon"] is None
    table = (suite / "summary.md").read_text()
    assert "| ε |" in table and "| 4 | 8.00 | 2/2 |" in table and "| – | – | 2/2 |" in table


def test_a_suite_mixing_wire_payload_or_code_versions_is_flagged(suite, capsys):
    """One warning line (printed and in summary.md) and ``mixed_versions`` in summary.json when
    the suite's runs differ in wire version, payload format or code version (run.json's
    provenance; runs without it are ``unrecorded``)."""
    write_report("s", suite, SPEC)
    assert json.loads((suite / "summary.json").read_text())["mixed_versions"] == {}
    assert "warning" not in capsys.readouterr().out + (suite / "summary.md").read_text()

    def prov(code):
        return {"wire": "fedlora/v2", "provenance": {"code": {"source_sha256": code * 64}}}

    for name in ("fedavg", "small", "bad"):
        for seed in (1, 2):
            (suite / f"runs/{name}/seed-{seed}/run.json").write_text(json.dumps(prov("a")))
    write_report("s", suite, SPEC)
    assert json.loads((suite / "summary.json").read_text())["mixed_versions"] == {}
    capsys.readouterr()
    (suite / "runs/bad/seed-2/run.json").write_text(json.dumps(
        {**prov("b"), "wire": "fedlora/v1", "config": {"payload-table": "digest"}}))
    rows = {r["name"]: r for r in write_report("s", suite, SPEC)}
    assert rows["bad"]["codes"] == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]
    mix = json.loads((suite / "summary.json").read_text())["mixed_versions"]
    assert mix == {"wire": ["fedlora/v1", "fedlora/v2"], "payload_format": [1, 2],
                   "code": ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]}
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("warning: suite s mixes runs of different "
                                                   "versions: wire fedlora/v1, fedlora/v2; "
                                                   "payload format 1, 2; code aaaa"), out
    assert out.strip() in (suite / "summary.md").read_text()
    # a run without provenance among recorded ones is a mix too
    (suite / "runs/bad/seed-2/run.json").write_text(json.dumps({"wire": "fedlora/v2"}))
    write_report("s", suite, SPEC)
    assert json.loads((suite / "summary.json").read_text())["mixed_versions"] == {
        "code": ["aaaaaaaaaaaa", "unrecorded"]}


def test_plot_curves_are_seed_means_without_a_stand_in_origin_and_styles_stay_apart():
    """The plotted curve of a configuration is the mean over its seeds at each evaluated round;
    round 0 (0 MB) is left out rather than drawn at a fake small MB; 20 series get 20 distinct
    (colour, marker) pairs."""
    from benchmarks.report import mean_curve, series_style

    a = [(0.0, 0.1), (2.0, 0.5), (4.0, 0.7)]
    b = [(0.0, 0.1), (4.0, 0.6), (8.0, 0.9)]
    assert mean_curve([a, b]) == [pytest.approx((3.0, 0.55)), pytest.approx((6.0, 0.8))]
    assert mean_curve([a, b[:2]]) == [pytest.approx((3.0, 0.55))]   # cut to the shorter seed
    assert len({series_style(i) for i in range(20)}) == 20


def test_runs_with_clients_holding_no_examples_are_marked(suite):
    """A run in which a client's replies were dropped for holding zero examples (partitioned
    with min-partition-size=0) is counted per configuration and marked § in the table."""
    path = suite / "runs/bad/seed-1/rounds.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    recs[1]["dropped_reasons"] = [{"node": 7, "reason": "MalformedReply: num-examples must be a "
                                   "positive number, got 0"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in recs))
    rows = {r["name"]: r for r in write_report("s", suite, SPEC)}
    assert rows["bad"]["seeds_with_empty_clients"] == 1
    assert rows["small"]["seeds_with_empty_clients"] == 0
    md = (suite / "summary.md").read_text()
    assert "| bad § |" in md and "| small |" in md and "ZERO examples" in md


def test_causal_lm_runs_get_a_perplexity_column_and_plot(suite):
    """Runs whose evaluations carry a held-out perplexity (task=causal-lm) get a "final ppl"
    column (mean ± population std of the last evaluation's perplexity over seeds), the values in
    summary.json and a perplexity_vs_mb.png; suites without perplexity get none of these."""
    write_report("s", suite, SPEC)
    assert "final ppl" not in (suite / "summary.md").read_text()
    assert not (suite / "perplexity_vs_mb.png").exists()
    for seed, ppl in ((1, 30.0), (2, 34.0)):
        path = suite / "runs" / "small" / f"seed-{seed}" / "rounds.jsonl"
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        for r in recs:
            if "accuracy" in r:
                r["perplexity"] = ppl + 100.0 * (r["round"] < 4)
        path.write_text("".join(json.dumps(x) + "\n" for x in recs))
    rows = {r["name"]: r for r in write_report("s", suite, SPEC)}
    assert rows["small"]["ppl_mean"] == pytest.approx(32.0)
    assert rows["small"]["ppl_std"] == pytest.approx(2.0)
    assert rows["fedavg"]["ppl_mean"] is None
    table = (suite / "summary.md").read_text()
    assert "| final ppl |" in table and "| 32.00 ± 2.00 |" in table
    lines = table.splitlines()
    col = [c.strip() for c in next(x for x in lines if x.startswith("| config")).split("|")]
    cells = [c.strip() for c in next(x for x in lines if x.startswith("| fedavg |")).split("|")]
    assert cells[col.index("final ppl")] == "–"
    summary = json.loads((suite / "summary.json").read_text())
    assert next(c for c in summary["configurations"] if c["name"] == "small")["ppls"] == [30.0, 34.0]
    pytest.importorskip("matplotlib")
    assert (suite / "perplexity_vs_mb.png").exists()


def test_simulated_time_to_the_target_where_runs_keep_the_simulated_clock(suite):
    """Runs whose records carry ``simulated_time`` (straggler-*, docs/async.md) get the simulated
    time of the same first evaluated round at/above FedAvg − 1 point as the MB column, mean over
    the seeds that reached it (how many did), in the table and summary.json; suites without it
    have no such column or keys."""
    write_report("s", suite, SPEC)
    assert "sim. time" not in (suite / "summary.md").read_text()
    assert "time_to_base_minus_1pt" not in json.loads(
        (suite / "summary.json").read_text())["configurations"][0]
    for name in ("fedavg", "small", "bad"):
        for seed in (1, 2):
            path = suite / f"runs/{name}/seed-{seed}/rounds.jsonl"
            recs = [json.loads(x) for x in path.read_text().splitlines()]
            for rec in recs[1:]:  # round r at simulated time 3·r (round 0: no field, time 0)
                rec["simulated_time"] = 3.0 * rec["round"] + (seed - 1)
            path.write_text("".join(json.dumps(x) + "\n" for x in recs))
    rows = {r["name"]: r for r in write_report("s", suite, SPEC)}
    # target 0.90: fedavg reaches it at round 4 in both seeds (times 12 and 13)
    assert rows["fedavg"]["time_to_base_minus_1pt"] == pytest.approx(12.5)
    assert rows["fedavg"]["seeds_reaching_time"] == 2
    # small: seed 2 only, at round 2 (time 6 + 1): the round whose MB the MB column shows
    assert rows["small"]["time_to_base_minus_1pt"] == pytest.approx(7.0)
    assert rows["small"]["seeds_reaching_time"] == rows["small"]["seeds_reaching"] == 1
    assert rows["bad"]["time_to_base_minus_1pt"] is None
    table = (suite / "summary.md").read_text()
    assert "| sim. time to FedAvg−1pt |" in table and "| 7.0 (1/2) |" in table
    assert "| 12.5 (2/2) |" in table
    summary = {c["name"]: c for c in json.loads((suite / "summary.json").read_text())
               ["configurations"]}
    assert summary["small"]["time_to_base_minus_1pt"] == pytest.approx(7.0)
    assert summary["bad"]["seeds_reaching_time"] == 0


def test_a_secure_upload_is_labelled_by_its_ring_not_by_the_codec_it_replaces():
    from benchmarks.report import _codec_text

    plain = {"codec-up": "fp32", "upload": "delta"}
    assert _codec_text(plain) == "fp32 / fp32"
    assert _codec_text({**plain, "secure-aggregation": True, "secagg-bits": 12}) == \
        "fp32 / secagg 12-bit"


@pytest.mark.parametrize("name", ["vision-async", "text-async"])
def test_async_suites_measure_time_and_bytes_to_sync_s0_minus_1pt(tmp_path, name):
    """Issue 37 item 4's numbers from the suites' own specs (names, rounds, seeds) on synthetic
    records: every configuration is measured against ``sync-s0``'s final accuracy − 1 point, and
    the MB and simulated time are those of the first evaluated round at or above it. Without
    the suites' ``baselines``, text-async (method fl-lora: no FedAvg row) had no target at all."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.suites import SUITES

    spec = SUITES[name]()
    assert spec["baselines"] == {k: "sync-s0" for k in spec["runs"]}
    rounds = int(spec["runs"]["sync-s0"]["num-server-rounds"])
    half = rounds // 2
    out = tmp_path / "s"
    # (accuracies by round, MB a round, simulated time a round)
    fake = {"sync-s0": ({0: 0.1, half: 0.5, rounds: 0.70}, 10.0, 1.0),
            "sync-s50": ({0: 0.1, half: 0.5, rounds: 0.70}, 10.0, 10.0),
            "async-s50": ({0: 0.1, half: 0.695, rounds: 0.71}, 12.0, 1.0)}
    for cfg, (accs, mb, dt) in fake.items():
        for seed in spec["seeds"]:
            d = out / "runs" / cfg / f"seed-{seed}"
            _write(d, accs, mb, rounds=rounds)
            recs = [json.loads(x) for x in (d / "rounds.jsonl").read_text().splitlines()]
            for rec in recs[1:]:
                rec["simulated_time"] = dt * rec["round"]
            (d / "rounds.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    rows = {r["name"]: r for r in write_report(name, out, spec)}
    assert set(rows) == set(fake)
    assert all(r["baseline"] == "sync-s0" for r in rows.values())
    assert rows["sync-s0"]["time_to_base_minus_1pt"] == pytest.approx(rounds)
    assert rows["sync-s0"]["mb_to_base_minus_1pt"] == pytest.approx(10.0 * rounds)
    assert rows["sync-s50"]["time_to_base_minus_1pt"] == pytest.approx(10.0 * rounds)
    assert rows["async-s50"]["time_to_base_minus_1pt"] == pytest.approx(half)
    assert rows["async-s50"]["mb_to_base_minus_1pt"] == pytest.approx(12.0 * half)
    assert rows["async-s50"]["seeds_reaching_time"] == len(spec["seeds"])
    table = (out / "summary.md").read_text()
    assert "| sim. time to base−1pt |" in table and f"| {float(half):.1f} (3/3) |" in table
