"""Read a suite's records and write ``summary.md`` (table) and ``accuracy_vs_mb.png``."""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.results import read_rounds


def mb_to_target(rounds: list[dict], target: float) -> float | None:
    for r in rounds:
        if r.get("accuracy", 0.0) >= target:
            return r["cum_mb"]
    return None


def summarize(out: Path, spec: dict) -> list[dict]:
    rows = []
    for name, rc in spec["runs"].items():
        run_dir = out / "runs" / name
        if not (run_dir / "summary.json").exists():  # absent or still running
            continue
        rounds = read_rounds(run_dir)
        meta = json.loads((run_dir / "run.json").read_text())
        accs = [r["accuracy"] for r in rounds]
        rows.append({
            "name": name, "method": rc.get("method", "flocora"),
            "codec": rc.get("codec-up", "fp32") + (" +EF" if rc.get("error-feedback") else ""),
            "rank": rc.get("rank-budget") if rc.get("method") in ("lora-a2",) else
            (None if rc.get("method") == "fedavg" else meta["config"].get("lora-rank")),
            "density": (rc.get("density-down"), rc.get("density-up")),
            "rounds": rounds[-1]["round"], "final": accs[-1], "best": max(accs),
            "mb_down": rounds[-1]["cum_mb_down"], "mb_up": rounds[-1]["cum_mb_up"],
            "mb": rounds[-1]["cum_mb"], "target_mb": mb_to_target(rounds, spec["target"]),
            "curve": [(r["cum_mb"], r["accuracy"]) for r in rounds],
        })
    base = next((r for r in rows if r["method"] == "fedavg"), None)
    for r in rows:
        r["ratio"] = base["mb"] / r["mb"] if base and r["mb"] else None
        r["delta"] = r["final"] - base["final"] if base else None
    return rows


def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def write_report(suite: str, out: Path, spec: dict) -> list[dict]:
    rows = summarize(out, spec)
    lines = [f"# {suite}", "",
             f"Made by `python benchmarks/run.py {suite}`; every byte measured on the wire "
             "(Flower message object trees, both directions, all clients). Target accuracy "
             f"for 'MB to target': {spec['target']}.", "",
             "| config | method | codec up | rank | final acc | best acc | MB down | MB up "
             "| MB to target | compression vs fedavg | Δacc vs fedavg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['method']} | `{r['codec'].replace('|', chr(92) + '|')}` | {r['rank'] or '–'} "
            f"| {r['final']:.4f} | {r['best']:.4f} | {r['mb_down']:.2f} | {r['mb_up']:.2f} "
            f"| {_f(r['target_mb'], '.2f')} | {_f(r['ratio'], '.2f')}x "
            f"| {_f(r['delta'], '+.4f')} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for r in rows:
            xs = [max(x, 1e-3) for x, _ in r["curve"]]
            ax.plot(xs, [y for _, y in r["curve"]], marker=".", label=r["name"])
        ax.set_xscale("log")
        ax.set_xlabel("cumulative MB on the wire (down + up, all clients)")
        ax.set_ylabel("test accuracy")
        ax.set_title(suite)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_mb.png", dpi=120)
        plt.close(fig)
    except ImportError:
        pass
    return rows
