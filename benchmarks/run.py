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
from fedlora.launch import EXIT_FAILED, EXIT_REFUSED, hub_offline, run_simulation  # noqa: E402
from fedlora.results import read_rounds  # noqa: E402
from fedlora.validate import ConfigError, check  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def complete(run_dir: Path, rounds: int) -> bool:
    try:
        recs = read_rounds(run_dir)
    except (OSError, ValueError):
        return False
    return (run_dir / "summary.json").exists() and bool(recs) and recs[-1]["round"] >= rounds


#: run-config keys that say where a run read or wrote, not what it computed
WHERE = ("run-dir", "run-name", "resume", "data-dir")


def stale(run_dir: Path, rc: dict) -> str | None:
    """Why a finished run no longer matches its configuration in the suite (a key whose value
    in the run's run.json differs from the suite's), or None. Keys the run did not record
    (added to fedlora after it ran) are not held against it."""
    try:
        had = json.loads((run_dir / "run.json").read_text()).get("config", {})
    except (OSError, ValueError):
        return None
    diff = [f"{k}: {had[k]!r} -> {v!r}" for k, v in rc.items()
            if k not in WHERE and k in had and had[k] != v]
    return "; ".join(diff) or None


#: the width a progress line must fit (a default terminal, a CI log viewer)
PROGRESS_COLUMNS = 80


def _short(label: str, width: int) -> str:
    """``label`` cut in the middle to ``width`` characters (``dp-text/lo…no-clip/seed3``)."""
    if len(label) <= width:
        return label
    head = (width - 1) // 2
    return label[:head] + "…" + label[len(label) - (width - 1 - head):]


def _progress(run_dir: Path, name: str, rounds: int, stop: threading.Event, t0: float,
              config: tuple[int, int] | None = None) -> None:
    """Watch ``run_dir/rounds.jsonl`` until ``stop`` is set and show config i/N, round r/R,
    accuracy, cumulative MB, elapsed and ETA in at most :data:`PROGRESS_COLUMNS` columns (the
    configuration's name shortened in the middle to fit; the line before the run names it in
    full): a rich progress bar on a terminal, one plain line per new round otherwise (nohup
    logs, CI). ``config`` = (i, N), the run's place in the suite (the caller passes it:
    ``kwargs={"config": (i, len(runs))}``). ETA = seconds per round so far (from the records'
    ``wall_s``, so start-up is not counted) × rounds left."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    where = f"{config[0]}/{config[1]} " if config else ""

    def hms(s: float) -> str:
        if s != s or s < 0:  # NaN: no estimate yet
            return "?"
        s = int(s)
        if s >= 3600:
            return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
        return f"{s // 60}:{s % 60:02d}"

    def poll(last_mtime: float) -> tuple[float, dict | None]:
        """(mtime, status) where status is None when rounds.jsonl did not change."""
        try:
            mtime = (run_dir / "rounds.jsonl").stat().st_mtime
            if mtime == last_mtime:
                return mtime, None
            recs = read_rounds(run_dir)
            if not recs:
                return mtime, None
            last, first = recs[-1], recs[0]
            r, r0 = int(last.get("round", 0)), int(first.get("round", 0))
            eta = float("nan")
            if r > r0 and "wall_s" in last and "wall_s" in first:
                per_round = (float(last["wall_s"]) - float(first["wall_s"])) / (r - r0)
                eta = max(0.0, per_round * (rounds - r) - (time.time() - mtime))
            elif r > 0:
                eta = (time.time() - t0) / r * (rounds - r)
            accs = [x["accuracy"] for x in recs if x.get("accuracy") is not None]
            return mtime, {"round": r, "acc": f"{float(accs[-1]):.4f}" if accs else "-",
                           "mb": f"{float(last.get('cum_mb', 0.0)):.2f}",
                           "eta_at": time.time() + eta}
        except (OSError, ValueError, TypeError):  # not there yet, a line half written, a null
            return last_mtime, None

    mtime, st = 0.0, None
    if not sys.stdout.isatty():
        while True:
            done = stop.wait(5.0)
            mtime, new = poll(mtime)
            if new is not None and (st is None or new["round"] != st["round"]):
                st = new
                tail = (f" round {st['round']}/{rounds} acc {st['acc']} {st['mb']} MB "
                        f"{hms(time.time() - t0)} ETA {hms(st['eta_at'] - time.time())}")
                room = PROGRESS_COLUMNS - len(tail) - len(where) - 4
                print(f"  [{where}{_short(name, max(room, 8))}]{tail}", flush=True)
            if done:
                return
    # label, a 10-column bar and the numbers: 80 columns with a 22-character label
    columns = (TextColumn(_short(where + name, 22), markup=False), BarColumn(bar_width=10),
               TextColumn("{task.completed:.0f}/{task.total:.0f} acc {task.fields[acc]} "
                          "{task.fields[mb]} MB {task.fields[el]} ETA {task.fields[eta]}",
                          markup=False))
    with Progress(*columns, console=Console(), refresh_per_second=2) as bar:
        task = bar.add_task(name, total=max(rounds, 1), acc="-", mb="-", el="0:00", eta="?")
        while True:
            done = stop.wait(1.0)
            mtime, new = poll(mtime)
            st = new or st
            fields = {"el": hms(time.time() - t0)}
            if st is not None:
                fields.update(completed=st["round"], acc=st["acc"], mb=st["mb"],
                              eta=hms(st["eta_at"] - time.time()))
            bar.update(task, **fields)
            if done:
                break


def planned_runs(spec: dict) -> list[tuple[str, str, dict]]:
    """(configuration, run folder relative to ``runs/``, run config) for every run of a suite:
    one per configuration, or one per configuration × seed when the suite lists ``seeds``
    (configuration-major, so a configuration's seeds finish together)."""
    seeds = spec.get("seeds")
    if not seeds:
        return [(name, name, rc) for name, rc in spec["runs"].items()]
    return [(name, f"{name}/seed-{s}", {**rc, "seed": s})
            for name, rc in spec["runs"].items() for s in seeds]


def check_runs(runs: list[tuple[str, str, dict]], out: Path, light: bool = False) -> None:
    """Every planned run's config through the launcher's check (fedlora/validate.py) before
    the first one starts: a ConfigError naming the configuration."""
    for name, rel, rc in runs:
        run_dir = out / "runs" / rel
        try:
            check({**rc, "run-dir": str(run_dir.parent), "run-name": run_dir.name}, light=light,
                  hub_offline=hub_offline())
        except ConfigError as err:
            raise ConfigError(f"configuration {rel!r}: {err}") from None


def run_suite(suite: str, out: Path, only: list[str] | None = None, force: bool = False,
              cpus_per_node: int = 1, gpus_per_node: float = 0,
              seeds: list[int] | None = None, light: bool = False) -> list[tuple[str, str]]:
    """Run the suite; returns the runs that failed as (run, one-line reason). ConfigError
    before anything starts when a configuration is refused."""
    spec = SUITES[suite]()
    runs = [r for r in planned_runs(spec) if not only or r[0] in only]
    if seeds:  # e.g. screen every configuration on seed 1 before spending seeds 2 and 3
        runs = [r for r in runs if r[2].get("seed") in seeds]
    check_runs(runs, out, light)
    failed: list[tuple[str, str]] = []
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(spec, indent=2))
    t_suite = time.time()
    if spec.get("centralized") and (not only or "centralized" in only):
        from benchmarks.centralized import run_reference

        run_reference(spec, out, force=force)
    for i, (name, rel, rc) in enumerate(runs, 1):
        run_dir = out / "runs" / rel
        rounds = int(rc.get("num-server-rounds", 5))
        changed = stale(run_dir, rc) if complete(run_dir, rounds) else None
        if complete(run_dir, rounds) and not force and not changed:
            print(f"[{i}/{len(runs)}] {rel}: complete, skipped", flush=True)
            continue
        if changed:  # the suite's configuration moved on: the old records are not its runs
            print(f"[{i}/{len(runs)}] {rel}: finished with another config ({changed}), run "
                  "again", flush=True)
        # an interrupted run continues from its last checkpoint (same config only); else anew
        from fedlora.checkpoint import resumable

        resume, why = (False, "--force") if force else resumable(run_dir, rc)
        if resume:
            rc = {**rc, "resume": str(run_dir.resolve())}
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[{i}/{len(runs)}] {rel}: {rounds} rounds on {spec['nodes']} nodes "
              f"{f'(resuming after {why}) ' if resume else ''}"
              f"(suite elapsed {time.time() - t_suite:.0f}s)", flush=True)
        stop, t0 = threading.Event(), time.time()
        watcher = threading.Thread(target=_progress, args=(run_dir, rel, rounds, stop, t0),
                                   kwargs={"config": (i, len(runs))}, daemon=True)
        watcher.start()
        try:
            res, _ = run_simulation({**rc, "run-dir": str(run_dir.parent),
                                     "run-name": run_dir.name},
                                    nodes=spec["nodes"], work_dir=out / ".flwr" / name,
                                    timeout=4 * 3600, cpus_per_node=cpus_per_node,
                                    gpus_per_node=gpus_per_node,
                                    ray_cpus=int(spec.get("ray-cpus", 0)))
        finally:
            stop.set()
            watcher.join()
        run_dir.parent.mkdir(parents=True, exist_ok=True)  # a run refused at start made none
        (run_dir.parent / f"{run_dir.name}.log").write_text(res.stdout or "")
        reason = res.reason or ("" if complete(run_dir, rounds) else
                                f"records stop before round {rounds}")
        status = f"FAILED: {reason}" if reason else "ok"
        if reason:
            failed.append((rel, reason))
        print(f"[{i}/{len(runs)}] {rel}: {status} in {time.time() - t0:.0f}s", flush=True)
        shutil.rmtree(out / ".flwr" / name, ignore_errors=True)
        write_report(suite, out, spec)  # tables grow as configurations finish
    write_report(suite, out, spec)
    return failed


def main(argv=None, light: bool = False) -> int:
    """Exit status: 0 every run completed; 1 some failed (each named in its ``FAILED`` line,
    the first on the last line); 2 a configuration was refused before any run started.
    ``light``: check codec specs without importing torch."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--out", default=None, help="default: results/<suite>")
    ap.add_argument("--only", nargs="*", help="configuration names to run ('centralized' for "
                    "the suite's centralized reference)")
    ap.add_argument("--force", action="store_true", help="rerun complete runs too")
    ap.add_argument("--seeds", nargs="*", type=int,
                    help="run only these of the suite's seeds (the report still counts all)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--cpus-per-node", type=int, default=1,
                    help="Ray CPUs per simulated node (an integer: Flower's "
                         "client-resources-num-cpus)")
    ap.add_argument("--gpus-per-node", type=float, default=0,
                    help="Ray GPU share per simulated node, e.g. 0.1 for the paper-* presets on "
                         "one GPU (clients train on it with the default device=auto)")
    a = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # so the launcher's cleanup runs on a stop
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    out = Path(a.out or ROOT / "results" / a.suite).resolve()
    failed: list[tuple[str, str]] = []
    if a.report_only:
        write_report(a.suite, out, SUITES[a.suite]())
    else:
        try:
            failed = run_suite(a.suite, out, a.only, a.force, a.cpus_per_node, a.gpus_per_node,
                               a.seeds, light=light)
        except ConfigError as err:
            print(f"fedlora: refused: suite {a.suite!r} {err}", file=sys.stderr, flush=True)
            return EXIT_REFUSED
    print(f"report: {out / 'summary.md'}  plot: {out / 'accuracy_vs_mb.png'}")
    if failed:  # the other runs went on; their records and the report are written
        first, why = failed[0]
        print(f"fedlora: {len(failed)} run(s) failed, first {first}: {why}", file=sys.stderr,
              flush=True)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    raise SystemExit(main(light=True))
