"""Run a named suite: every configuration as a real Flower simulation (``fedlora.launch``, the
same path as ``flwr run .``), records in ``results/<suite>/runs/<config>/``; an interrupted suite
resumes (runs whose records are complete are skipped). Then writes the report.

    python benchmarks/run.py vision-quick            # CI-sized, minutes
    python benchmarks/run.py vision-cpu [--only flasc-d0.25 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import write_report  # noqa: E402
from benchmarks.suites import SUITES  # noqa: E402
from fedlora.launch import run_simulation  # noqa: E402
from fedlora.results import read_rounds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def complete(run_dir: Path, rounds: int) -> bool:
    try:
        recs = read_rounds(run_dir)
    except (OSError, ValueError):
        return False
    return (run_dir / "summary.json").exists() and bool(recs) and recs[-1]["round"] >= rounds


def _progress(run_dir: Path, name: str, rounds: int, stop: threading.Event, t0: float) -> None:
    seen = -1
    while not stop.wait(5.0):
        try:
            recs = read_rounds(run_dir)
        except (OSError, ValueError):
            continue
        if recs and recs[-1]["round"] != seen:
            seen = recs[-1]["round"]
            done = max(seen, 0)
            el = time.time() - t0
            eta = el / done * (rounds - done) if done else float("nan")
            print(f"  [{name}] round {seen}/{rounds} acc {recs[-1].get('accuracy', 0):.4f} "
                  f"cum {recs[-1].get('cum_mb', 0):.2f} MB  elapsed {el:.0f}s  ETA {eta:.0f}s",
                  flush=True)


def run_suite(suite: str, out: Path, only: list[str] | None = None, force: bool = False,
              cpus_per_node: float = 1, gpus_per_node: float = 0) -> None:
    spec = SUITES[suite]()
    runs = {k: v for k, v in spec["runs"].items() if not only or k in only}
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(spec, indent=2))
    t_suite = time.time()
    for i, (name, rc) in enumerate(runs.items(), 1):
        run_dir = out / "runs" / name
        rounds = int(rc.get("num-server-rounds", 5))
        if complete(run_dir, rounds) and not force:
            print(f"[{i}/{len(runs)}] {name}: complete, skipped", flush=True)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[{i}/{len(runs)}] {name}: {rounds} rounds on {spec['nodes']} nodes "
              f"(suite elapsed {time.time() - t_suite:.0f}s)", flush=True)
        stop, t0 = threading.Event(), time.time()
        watcher = threading.Thread(target=_progress, args=(run_dir, name, rounds, stop, t0),
                                   daemon=True)
        watcher.start()
        try:
            res, _ = run_simulation({**rc, "run-dir": str(out / "runs"), "run-name": name},
                                    nodes=spec["nodes"], work_dir=out / ".flwr" / name,
                                    timeout=4 * 3600, cpus_per_node=cpus_per_node,
                                    gpus_per_node=gpus_per_node)
        finally:
            stop.set()
            watcher.join()
        (run_dir.parent / f"{name}.log").write_text(res.stdout or "")
        status = "ok" if res.returncode == 0 and complete(run_dir, rounds) else "FAILED"
        print(f"[{i}/{len(runs)}] {name}: {status} in {time.time() - t0:.0f}s", flush=True)
        shutil.rmtree(out / ".flwr" / name, ignore_errors=True)
    write_report(suite, out, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--out", default=None, help="default: results/<suite>")
    ap.add_argument("--only", nargs="*", help="configuration names to run")
    ap.add_argument("--force", action="store_true", help="rerun complete runs too")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--cpus-per-node", type=float, default=1, help="Ray CPUs per simulated node")
    ap.add_argument("--gpus-per-node", type=float, default=0,
                    help="Ray GPU share per simulated node, e.g. 0.1 for the paper-* presets on "
                         "one GPU (clients train on it with the default device=auto)")
    a = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # so the launcher's cleanup runs on a stop
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    out = Path(a.out or ROOT / "results" / a.suite).resolve()
    if a.report_only:
        write_report(a.suite, out, SUITES[a.suite]())
    else:
        run_suite(a.suite, out, a.only, a.force, a.cpus_per_node, a.gpus_per_node)
    print(f"report: {out / 'summary.md'}  plot: {out / 'accuracy_vs_mb.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
