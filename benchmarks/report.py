"""Read a suite's records and write ``summary.md`` (the frontier table), ``summary.json`` and
``accuracy_vs_mb.png``.

Per configuration (over its finished seeds): final accuracy mean ± std (the last round's central
evaluation), total MB both directions including control messages (mean), ``ratio_vs_fedavg``
(FedAvg's total MB / this one's), ``delta_vs_fedavg`` (accuracy points, mean), and "MB to reach
FedAvg's final accuracy − 1 point" (per seed: the cumulative MB at the first evaluated round at or
above it; the mean over seeds that reached it, with how many did). A configuration is on the
Pareto front when no other one has both higher mean accuracy and fewer mean MB. Only runs whose
records are complete are read; a configuration shows how many of the suite's seeds finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedlora.results import read_rounds

TOLERANCE = 0.01  # "equal accuracy": within one point of FedAvg's final accuracy
EPS = 1e-9  # float slack when comparing accuracies against that line
# the drop reason of a reply from a client that holds no examples (runs partitioned before
# min-partition-size existed): such a client trains nothing and is downloaded to every round
EMPTY_CLIENT = "num-examples must be a positive number, got 0"


def mb_to_target(rounds: list[dict], target: float) -> float | None:
    for r in rounds:
        if r.get("accuracy") is not None and r["accuracy"] >= target:
            return r["cum_mb"]
    return None


def time_to_target(rounds: list[dict], target: float) -> float | None:
    """The ``simulated_time`` (docs/async.md: a normal node's task = 1) of the same first
    evaluated round as :func:`mb_to_target` (round 0, the initial model, is at time 0)."""
    for r in rounds:
        if r.get("accuracy") is not None and r["accuracy"] >= target:
            return float(r.get("simulated_time", 0.0))
    return None


def _seed_dirs(out: Path, name: str, spec: dict) -> list[Path]:
    if spec.get("seeds"):
        return [out / "runs" / name / f"seed-{s}" for s in spec["seeds"]]
    return [out / "runs" / name]


def _finished(run_dir: Path, rounds: int) -> list[dict] | None:
    if not (run_dir / "summary.json").exists():
        return None
    recs = read_rounds(run_dir)
    if not recs or recs[-1]["round"] < rounds or recs[-1].get("accuracy") is None:
        return None
    return recs


def _wire(run_dir: Path) -> str:
    """The wire version a run was measured with (``run.json``'s ``wire``; runs from before
    the key existed used ``fedlora/v1``)."""
    try:
        return str(json.loads((run_dir / "run.json").read_text()).get("wire", "fedlora/v1"))
    except (OSError, ValueError):
        return "fedlora/v1"


def _table(run_dir: Path) -> str:
    """How a run's payloads named their tensors (run-config ``payload-table``; runs from before
    the key existed spelled the table out: ``names``)."""
    try:
        cfg = json.loads((run_dir / "run.json").read_text()).get("config", {})
    except (OSError, ValueError):
        return "names"
    return str(cfg.get("payload-table", "names"))


def _code(run_dir: Path) -> str:
    """The code a run was made with: run.json's ``provenance.code.source_sha256`` (first 12
    hex digits), ``unrecorded`` for runs from before provenance was recorded."""
    try:
        meta = json.loads((run_dir / "run.json").read_text())
        return str(meta["provenance"]["code"]["source_sha256"])[:12]
    except (OSError, ValueError, KeyError, TypeError):
        return "unrecorded"


def mixed_versions(rows: list[dict]) -> dict[str, list]:
    """What the suite's finished runs disagree on, of wire version, payload format and code
    version: ``{"wire": [...], "payload_format": [...], "code": [...]}`` for each that has more
    than one value across the suite, else {}."""
    seen = {"wire": {w for r in rows for w in r["wire"]},
            "payload_format": {1 if t == "names" else 2 for r in rows for t in r["tables"]},
            "code": {c for r in rows for c in r["codes"]}}
    return {k: sorted(v) for k, v in seen.items() if len(v) > 1}


def _codec_text(rc: dict) -> str:
    up = rc.get("codec-up", "fp32") + (" +EF" if rc.get("error-feedback") else "")
    if rc.get("secure-aggregation"):  # the upload is masked ring integers, not the codec's bytes
        up = f"secagg {rc.get('secagg-bits', 16)}-bit"
    down = rc.get("codec-down", "fp32")
    if rc.get("download") == "delta":
        down = f"Δ {down}"
    return f"{down} / {up}"


def summarize(out: Path, spec: dict) -> list[dict]:
    rows = []
    for name, rc in spec["runs"].items():
        rounds_wanted = int(rc.get("num-server-rounds", 5))
        seeds, wires, tables, codes = [], set(), set(), set()
        for d in _seed_dirs(out, name, spec):
            recs = _finished(d, rounds_wanted)
            if recs is not None:
                seeds.append(recs)
                wires.add(_wire(d))
                tables.add(_table(d))
                codes.add(_code(d))
        if not seeds:
            continue
        empty = sum(any(EMPTY_CLIENT in str(d.get("reason", "")) for r in s
                        for d in r.get("dropped_reasons", [])) for s in seeds)
        finals = [s[-1]["accuracy"] for s in seeds]
        mbs = [s[-1]["cum_mb"] for s in seeds]
        evals = [[r for r in s if r.get("accuracy") is not None] for s in seeds]
        rows.append({
            "name": name, "method": rc.get("method", "flocora"), "codecs": _codec_text(rc),
            "rank": (None if rc.get("method") == "fedavg" else
                     rc.get("rank-budget") if rc.get("method") == "lora-a2" else
                     rc.get("lora-rank")),
            "run_config": rc, "seeds_done": len(seeds), "wire": sorted(wires),
            "seeds_with_empty_clients": empty,
            "tables": sorted(tables), "codes": sorted(codes),
            "seeds_wanted": len(spec.get("seeds") or [None]),
            "rounds": seeds[0][-1]["round"],
            "final_mean": float(np.mean(finals)), "final_std": float(np.std(finals)),
            "finals": finals,
            "mb": float(np.mean(mbs)), "mbs": mbs,
            "mb_down": float(np.mean([s[-1]["cum_mb_down"] for s in seeds])),
            "mb_up": float(np.mean([s[-1]["cum_mb_up"] for s in seeds])),
            "mb_control": float(np.mean([s[-1].get("cum_mb_control", 0.0) for s in seeds])),
            "wall_s": float(np.mean([s[-1].get("wall_s", 0.0) for s in seeds])),
            # differential privacy: ε spent by the end (the accountant's, at the run's δ)
            "epsilon": (max(float(s[-1]["dp_epsilon"]) for s in seeds)
                        if all(s[-1].get("dp_epsilon") is not None for s in seeds) else None),
            "curves": [[(r["cum_mb"], r["accuracy"]) for r in e] for e in evals],
            "_evals": evals,
            **_perplexity(evals),
        })
    fedavg = next((r for r in rows if r["method"] == "fedavg" and r["name"] == "fedavg"),
                  next((r for r in rows if r["method"] == "fedavg"), None))
    by_name = {r["name"]: r for r in rows}
    baselines = spec.get("baselines")  # {config: the config it is compared with}; else FedAvg
    for r in rows:
        if baselines:
            r["baseline"] = baselines.get(r["name"])
            base = by_name.get(r["baseline"])
        else:
            base = fedavg
            r["baseline"] = fedavg["name"] if fedavg else None
        target = base["final_mean"] - TOLERANCE - EPS if base else None
        r["ratio"] = base["mb"] / r["mb"] if base and r["mb"] else None
        r["delta"] = (r["final_mean"] - base["final_mean"]) if base else None
        reached = [mb_to_target(e, target) for e in r["_evals"]] if target is not None else []
        hit = [m for m in reached if m is not None]
        r["mb_to_base_minus_1pt"] = float(np.mean(hit)) if hit else None
        r["seeds_reaching"] = len(hit)
        # runs with a simulated clock (straggler-*, async-order=simulated): time to the target
        timed = any("simulated_time" in x for e in r["_evals"] for x in e)
        times = [time_to_target(e, target) for e in r["_evals"]] \
            if timed and target is not None else []
        t_hit = [t for t in times if t is not None]
        r["time_to_base_minus_1pt"] = float(np.mean(t_hit)) if t_hit else None
        r["seeds_reaching_time"] = len(t_hit) if timed else None
        r["within_1pt"] = r["delta"] is not None and r["delta"] >= -TOLERANCE - EPS
        vs_fedavg = fedavg is not None and not baselines
        r["ratio_vs_fedavg"] = r["ratio"] if vs_fedavg else None
        r["delta_vs_fedavg"] = r["delta"] if vs_fedavg else None
        r["mb_to_fedavg_minus_1pt"] = r["mb_to_base_minus_1pt"] if vs_fedavg else None
    for r in rows:  # the front among the configurations compared with the same baseline
        peers = [o for o in rows if o["baseline"] == r["baseline"]]
        r["pareto"] = not any(o is not r and o["final_mean"] >= r["final_mean"]
                              and o["mb"] <= r["mb"]
                              and (o["final_mean"] > r["final_mean"] or o["mb"] < r["mb"])
                              for o in peers)
    return rows


def _perplexity(evals: list[list[dict]]) -> dict:
    """causal-lm runs: final held-out perplexity mean ± std over seeds and its curves
    ((cumulative MB, perplexity) per evaluated round); None where a seed lacks it."""
    if not evals or not all(e and e[-1].get("perplexity") is not None for e in evals):
        return {"ppl_mean": None, "ppl_std": None, "ppls": None, "ppl_curves": None}
    finals = [float(e[-1]["perplexity"]) for e in evals]
    return {"ppl_mean": float(np.mean(finals)), "ppl_std": float(np.std(finals)),
            "ppls": finals,
            "ppl_curves": [[(r["cum_mb"], r["perplexity"]) for r in e
                            if r.get("perplexity") is not None] for e in evals]}


def _ppl(r: dict) -> str:
    if r["ppl_mean"] is None:
        return "–"
    if r["seeds_done"] < 2:
        return f"{r['ppl_mean']:.2f} (one seed)"
    return f"{r['ppl_mean']:.2f} ± {r['ppl_std']:.2f}"


def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def _eps(v) -> str:
    """ε as measured: two decimals where it is a usable guarantee, scientific notation where it
    is not (APPFL-level local noise buys ε ≈ 10^7 over a run)."""
    if v is None:
        return "–"
    return format(v, ".2f") if v < 1000 else format(v, ".1e")


def _acc(r: dict) -> str:
    """Mean ± std over seeds; one seed has no spread to show."""
    if r["seeds_done"] < 2:
        return f"{r['final_mean']:.4f} (one seed)"
    return f"{r['final_mean']:.4f} ± {r['final_std']:.4f}"


def _time_reach(r: dict) -> str:
    """Mean simulated time to the target over the seeds that reached it (how many did)."""
    if r["time_to_base_minus_1pt"] is None:
        return "–"
    return f"{r['time_to_base_minus_1pt']:.1f} ({r['seeds_reaching_time']}/{r['seeds_done']})"


def _json_rows(rows: list[dict]) -> list[dict]:
    keep = ("name", "method", "codecs", "rank", "run_config", "seeds_done", "seeds_wanted",
            "seeds_with_empty_clients",
            "wire", "tables", "codes", "rounds", "final_mean", "final_std", "finals", "mb", "mbs",
            "mb_down", "mb_up", "mb_control", "wall_s", "epsilon", "ratio_vs_fedavg",
            "delta_vs_fedavg",
            "mb_to_fedavg_minus_1pt", "baseline", "ratio", "delta", "mb_to_base_minus_1pt",
            "seeds_reaching", "within_1pt", "pareto", "ppl_mean", "ppl_std", "ppls")
    timed = ("time_to_base_minus_1pt", "seeds_reaching_time")  # only where a run has the clock
    return [{**{k: r[k] for k in keep},
             **({k: r[k] for k in timed} if r["seeds_reaching_time"] is not None else {})}
            for r in rows]


def write_report(suite: str, out: Path, spec: dict) -> list[dict]:
    rows = summarize(out, spec)
    central = None
    if (out / "centralized.json").exists():
        central = json.loads((out / "centralized.json").read_text())
    seeds = spec.get("seeds")
    grouped = bool(spec.get("baselines"))
    # ‡ marks format-1 (spelled-out tensor table) rows, where a table mixes the two formats
    mixed = len({t for r in rows for t in r["tables"]}) > 1

    def named(r: dict) -> bool:
        return mixed and "names" in r["tables"]

    def schedule(r: dict) -> str:
        rc = r["run_config"]
        return f"{rc.get('num-server-rounds', 5)}×{rc.get('local-epochs', 1)}"

    # a rounds × local-epochs column where configurations differ in it; ε where any has DP
    sched = len({schedule(r) for r in rows}) > 1
    dp = any(r["epsilon"] is not None for r in rows)
    ppl = any(r["ppl_mean"] is not None for r in rows)  # causal-lm: held-out perplexity
    timed = any(r["seeds_reaching_time"] is not None for r in rows)  # a simulated clock

    who = "its baseline" if grouped else "FedAvg"
    short = "base" if grouped else "fedavg"
    lines = [f"# {suite}", "",
             f"Made by `python benchmarks/run.py {suite}`; every byte measured on the wire "
             "(Flower message object trees, both directions, all clients, control messages "
             "included). Accuracy: the final round's central evaluation"
             + (f", mean ± population std (ddof=0) over seeds {seeds}" if seeds else "") + ". "
             f"Ratio = {who}'s total MB / this configuration's. ★ = on the Pareto front "
             "(no configuration"
             + (" with the same baseline" if grouped else "")
             + " has both higher accuracy and fewer bytes).", "",
             "| config | method | codecs (down / up) | rank "
             + ("| rounds × epochs " if sched else "")
             + ("| ε " if dp else "")
             + "| seeds | final acc " + ("| final ppl " if ppl else "") + "| MB total | MB down "
             f"| MB up | MB to {'base' if grouped else 'FedAvg'}−1pt "
             + (f"| sim. time to {'base' if grouped else 'FedAvg'}−1pt " if timed else "")
             + ("| baseline " if grouped else "")
             + f"| ratio vs {short} | Δacc vs {short} | front |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if grouped else "")
             + ("---|" if sched else "") + ("---|" if dp else "") + ("---|" if ppl else "")
             + ("---|" if timed else "")
             + "---|---|---|"]
    order = (sorted(rows, key=lambda r: (str(r["baseline"]), -r["mb"])) if grouped
             else sorted(rows, key=lambda r: r["mb"], reverse=True))
    for r in order:
        esc = r["codecs"].replace("|", chr(92) + "|")
        reach = (f"{r['mb_to_base_minus_1pt']:.2f} ({r['seeds_reaching']}/{r['seeds_done']})"
                 if r["mb_to_base_minus_1pt"] is not None else "–")
        marks = ((" †" if "fedlora/v1" in r["wire"] else "") + (" ‡" if named(r) else "")
                 + (" §" if r["seeds_with_empty_clients"] else ""))
        lines.append(
            f"| {r['name']}{marks} | {r['method']} | `{esc}` | {r['rank'] or '–'} "
            + (f"| {schedule(r)} " if sched else "")
            + (f"| {_eps(r['epsilon'])} " if dp else "")
            + f"| {r['seeds_done']}/{r['seeds_wanted']} "
            f"| {_acc(r)} " + (f"| {_ppl(r)} " if ppl else "")
            + f"| {r['mb']:.2f} | {r['mb_down']:.2f} "
            f"| {r['mb_up']:.2f} | {reach} "
            + (f"| {_time_reach(r)} " if timed else "")
            + (f"| {r['baseline'] or '–'} " if grouped else "")
            + f"| {_f(r['ratio'], '.1f')}x "
            f"| {_f(None if r['delta'] is None else 100 * r['delta'], '+.2f')} "
            f"| {'★' if r['pareto'] else ''} |")
    if timed:
        lines += ["", "Sim. time: the records' `simulated_time` (docs/async.md: a normal node's "
                  "task costs 1, a straggler's `straggler-slowdown`) at the first evaluated round "
                  "at or above the target, mean over the seeds that reached it (how many did); "
                  "wall time is in the records (`wall_s`)."]
    if any("fedlora/v1" in r["wire"] for r in rows):
        lines += ["", "† measured (in some seeds) with wire v1, which also put the codec spec "
                  "in each message's Array stype: 5 bytes more per fp32 message, 25 per "
                  "`topk:0.02|affine:4|zstd` message (tests/test_strategy.py measures both), "
                  "every other byte the same as v2 (docs/architecture.md, wire versions)."]
    if any(named(r) for r in rows):
        lines += ["", "‡ measured (in some seeds) with payload format 1, whose header spells out "
                  "the tensor table (names and shapes) where format 2 (`payload-table=digest`, "
                  "the default since 2026-12-01) sends an 8-byte digest of it: 696 bytes more "
                  "per ResNet-8 (w16) FedAvg message, 1,082 per FLoCoRA r4 message, every other "
                  "byte the same (tests/test_payload_digest.py; docs/architecture.md, wire "
                  "versions)."]
    if any(r["seeds_with_empty_clients"] for r in rows):
        lines += ["", "§ in some seeds (per configuration: `seeds_with_empty_clients` in "
                  "summary.json) one or more clients held ZERO examples (partitioned with "
                  "`min-partition-size=0`): their replies were dropped every round (\"num-examples "
                  "must be a positive number, got 0\") and each took a full download every round, "
                  "so those runs federate fewer clients and count more download bytes than the "
                  "configuration says."]
    if central:
        lines += ["", f"Centralized reference ({central['config']}'s model on the pooled client "
                  f"data, same examples seen, `python benchmarks/run.py {suite} --only "
                  f"centralized`): accuracy "
                  + (f"{central['accuracy_mean']:.4f} (one seed)." if len(central["seeds"]) < 2
                     else f"{central['accuracy_mean']:.4f} ± {central['accuracy_std']:.4f} over "
                          f"{len(central['seeds'])} seeds.")]
    mix = mixed_versions(rows)
    if mix:  # numbers measured with different code or formats: say so where they are read
        what = "; ".join(f"{k.replace('_', ' ')} {', '.join(map(str, v))}" for k, v in mix.items())
        warning = f"warning: suite {suite} mixes runs of different versions: {what}"
        print(warning, flush=True)
        lines += ["", f"**{warning}** (per configuration: `wire`, `tables`, `codes` in "
                  "summary.json)."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    summary = {"suite": suite, "command": f"python benchmarks/run.py {suite}",
               "seeds": seeds, "tolerance": TOLERANCE, "mixed_versions": mix,
               "configurations": _json_rows(rows), "centralized": central}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(suite, out, rows)
    if ppl:
        _plot(suite, out, [r for r in rows if r["ppl_mean"] is not None], perplexity=True)
    return rows


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The mean over seeds of (cumulative MB, accuracy) at each evaluated round (the seeds of a
    configuration evaluate at the same rounds; a shorter seed cuts the curve), without round 0:
    it sits at 0 MB, which a log axis cannot show (no stand-in origin is drawn)."""
    n = min(len(c) for c in curves)
    pts = [(float(np.mean([c[i][0] for c in curves])), float(np.mean([c[i][1] for c in curves])))
           for i in range(n)]
    return [p for p in pts if p[0] > 0]


def series_style(i: int) -> tuple[str, str]:
    """Series i's (colour, marker): 10 colours x 10 markers, so 100 series stay apart."""
    return f"C{i % 10}", MARKERS[(i // 10 + i) % len(MARKERS)]


def _plot(suite: str, out: Path, rows: list[dict], perplexity: bool = False) -> None:
    """accuracy_vs_mb.png, or with ``perplexity`` perplexity_vs_mb.png (log y; no Pareto front
    or baseline line: the front is ranked by accuracy)."""
    curves, mean, std = (("ppl_curves", "ppl_mean", "ppl_std") if perplexity
                         else ("curves", "final_mean", "final_std"))
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    for i, r in enumerate(sorted(rows, key=lambda r: r["name"])):
        colour, marker = series_style(i)
        curve = mean_curve(r[curves])
        seeds = (f"mean of {r['seeds_done']} seeds" if r["seeds_done"] > 1 else
                 f"ONE seed: {r['run_config'].get('seed', '?')}")
        if curve:
            ax.plot(*zip(*curve), marker=marker, color=colour, markersize=4, linewidth=1,
                    alpha=0.75, label=f"{r['name']} ({seeds})")
        ax.errorbar([r["mb"]], [r[mean]], yerr=[r[std]], fmt=marker,
                    color=colour, markersize=11 if r["pareto"] else 6,
                    markeredgecolor="k" if r["pareto"] else colour, capsize=2)
    groups: dict = {}
    for r in ([] if perplexity else rows):  # the fronts and base lines are accuracy's
        groups.setdefault(r["baseline"], []).append(r)
    by_name = {r["name"]: r for r in rows}
    for g, (base, members) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        style = ("--", ":", "-.")[g % 3]
        front = sorted((r["mb"], r["final_mean"]) for r in members if r["pareto"])
        if len(front) > 1:
            ax.plot(*zip(*front), "k" + style, linewidth=1,
                    label=f"Pareto front vs {base} (seed means)")
        if base in by_name:
            line = by_name[base]["final_mean"] - TOLERANCE
            ax.axhline(line, color="grey", linestyle=style, linewidth=0.8,
                       label=f"{base} final − 1 point ({line:.4f})")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MB on the wire (down + up + control, all clients)")
    ax.set_ylabel("held-out perplexity" if perplexity else "test accuracy")
    if perplexity:
        ax.set_yscale("log")
    ax.set_title(f"{suite}: curves = mean over seeds per evaluated round; final points "
                 "± population std (ddof=0); large black-edged = Pareto front", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    name = "perplexity_vs_mb.png" if perplexity else "accuracy_vs_mb.png"
    fig.savefig(out / name, dpi=120, bbox_inches="tight")
    plt.close(fig)


def update_readme(suite: str, results: Path, readme: Path) -> bool:
    """Replace the README block between ``<!-- results:<suite> -->`` and
    ``<!-- /results:<suite> -->`` with the suite's ``summary.md`` (its title dropped)."""
    text = readme.read_text()
    start, end = f"<!-- results:{suite} -->", f"<!-- /results:{suite} -->"
    if start not in text or end not in text:
        return False
    table = (results / suite / "summary.md").read_text().split("\n", 2)[2].strip()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    return True


def main(argv=None) -> int:
    import argparse
    import sys

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from benchmarks.suites import SUITES

    ap = argparse.ArgumentParser(description="Rewrite a suite's report from its records and, "
                                 "with --docs, its table in the docs page that holds its block.")
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--docs", "--readme", dest="docs", action="store_true",
                    help="also rewrite the <!-- results:SUITE --> block of README.md or docs/*.md")
    a = ap.parse_args(argv)
    out = root / "results" / a.suite
    write_report(a.suite, out, SUITES[a.suite]())
    if a.docs:
        pages = [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
                 if update_readme(a.suite, root / "results", p)]
        if not pages:
            print(f"no <!-- results:{a.suite} --> block in README.md or docs/*.md",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
