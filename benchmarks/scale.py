"""Scale and overhead of a simulation, as ratios and breakdowns measured in one run (issue 16).

    python benchmarks/scale.py [--nodes 1000 10000 100000] [--overhead-rounds 6]
                               [--out results/scale]

1. **Flower overhead**: ``vision-conv``'s federation (ResNet-8 width 16, Fashion-MNIST, 5 of 10
   clients a round, 2 local epochs of up to 1,000 examples, fp32 FedAvg) as a real simulation
   (``fedlora.launch``, 2 ClientApp actors), central evaluation only after the last round; then
   the *bare* local training of exactly the clients each round sampled (the records'
   ``partitions``), the same code (``task.train`` from the model and data each client builds),
   two worker processes for two actors, one round after the other. Ratio = Σ over rounds 2..R
   of (``round_s`` − ``eval_s``) / Σ of the bare rounds' wall times (round 1 carries the
   engine's start; evaluation is counted separately, as ``eval_s``).
2. **Launch to round 1**, broken down: the launcher's wall time to the first round's record,
   the ServerApp's own start (``wall_s`` of the round-0 evaluation), and, measured here in fresh
   processes, the parts that are fedlora's: importing the ClientApp, loading Fashion-MNIST,
   partitioning (computed, and loaded from the per-machine cache), building the model.
3. **Many nodes**: for each ``--nodes`` N, a 3-round run with ``client-sampling=flower`` (no
   per-node query), 10 nodes sampled a round, IID partitions of up to 32 examples, width-8
   model: round-1 time (ServerApp start → record), later rounds' times, and the machine's memory
   in use (MemTotal − MemAvailable, sampled every 0.5 s) at its peak minus before the run:
   per node = the difference between the largest and smallest N over their difference in
   nodes (the fixed part, Ray and its actors, cancels); and, timed apart with Flower's
   simulation-engine functions, its own start-up work for N nodes (registering nodes and their
   Contexts, one poll sweep). (``client-sampling=partition`` would first query every node
   once: ~17 ms a node in Flower 1.41's simulation, so it is for up to ~1,000 nodes.)

Everything runs on this machine as it is: a busy machine stretches every time (the load average
is printed); the overhead ratio's two sides are measured back to back.

``--whatif-flower-config-cache`` (a what-if, labelled as such in the report; write it to its own
``--out``): every process the benchmark starts gets
``benchmarks/whatif_flower_config_cache/sitecustomize.py`` on ``PYTHONPATH``, which makes
Flower's engine parse the app's ``pyproject.toml`` once instead of once per node — what round 1
would take if Flower did that itself. fedlora's own runs never load it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedlora.launch import run_simulation  # noqa: E402

OVERHEAD = {"dataset": "fashion-mnist", "model": "resnet8", "feature-maps": 16,
            "augment": False, "partitioner": "dirichlet", "dirichlet-alpha": 0.5,
            "fraction-train": 0.5, "min-train-nodes": 5, "min-available-nodes": 10,
            "local-epochs": 2, "max-examples-per-client": 1000, "batch-size": 32, "lr": 0.05,
            "lr-schedule": "cosine", "eval-max-examples": 0, "method": "fedavg", "seed": 1}
MANY = {"dataset": "fashion-mnist", "model": "resnet8", "feature-maps": 8, "method": "fedavg",
        "partitioner": "iid", "max-examples-per-client": 32, "client-sampling": "flower",
        "min-train-nodes": 10, "num-server-rounds": 3, "eval-max-examples": 500, "seed": 3}


def mem_used_mb() -> float:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = float(v.split()[0]) / 1024
    return info["MemTotal"] - info["MemAvailable"]


class PeakMemory:
    """Peak of :func:`mem_used_mb` while the ``with`` block runs."""

    def __enter__(self):
        self.before = mem_used_mb()
        self.peak = self.before
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, mem_used_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x]


def simulate(rc: dict, nodes: int, work: Path) -> tuple[list[dict], float]:
    t = time.time()
    res, run_dir = run_simulation(rc, nodes=nodes, work_dir=work, timeout=3600)
    if res.returncode != 0:  # the run's own log is in the work folder's logs
        raise SystemExit(f"fedlora: run failed ({nodes} nodes): {res.reason}")
    return records(run_dir), time.time() - t


# ------------------------------------------------------------------------- 1. bare training

_TASK = None


def _worker_init(rc: dict, threads: int) -> None:
    global _TASK
    import torch

    from fedlora.config import RunConfig
    from fedlora.tasks import make_task

    torch.set_num_threads(threads)
    _TASK = (RunConfig.from_run_config(rc), make_task(RunConfig.from_run_config(rc)))


def _bare_client(job: tuple[int, int, int]) -> float:
    """Train one client as its ClientApp would (fresh model, its partition, this round's
    rate); returns the seconds of ``task.train`` alone."""
    server_round, partition, num_partitions = job
    cfg, task = _TASK
    model = task.new_model(adapter=False)
    data = task.client_data(partition, num_partitions)
    seed = int(cfg.seed * 1_000_003 + server_round * 1009 + partition)
    t = time.perf_counter()
    task.train(model, data, seed=seed, lr=cfg.lr_at(server_round))
    return time.perf_counter() - t


def overhead(rounds: int, work: Path) -> dict:
    rc = {**OVERHEAD, "num-server-rounds": rounds, "eval-every": rounds}
    recs, _ = simulate(rc, 10, work)
    train = [r for r in recs if r["round"] >= 2]
    sim_s = sum(r["round_s"] - float(r.get("eval_s") or 0.0) for r in train)
    eval_s = sum(float(r.get("eval_s") or 0.0) for r in recs if r["round"] >= 1)
    from fedlora.config import RunConfig

    threads = max(1, RunConfig.from_run_config(rc).client_threads)
    ctx = mp.get_context("spawn")
    with ctx.Pool(2, initializer=_worker_init, initargs=(rc, threads)) as pool:
        pool.map(_bare_client, [(1, p, 10) for p in (0, 1)])  # warm: imports, data, caches
        bare = []
        for r in train:
            t = time.perf_counter()
            pool.map(_bare_client, [(r["round"], p, 10) for p in r["partitions"]], chunksize=1)
            bare.append(time.perf_counter() - t)
    return {"rounds": rounds, "rounds_compared": [r["round"] for r in train],
            "simulation_train_s": sim_s, "bare_train_s": sum(bare),
            "ratio": sim_s / sum(bare), "eval_s_total": eval_s,
            "round1_s": recs[1]["round_s"] if len(recs) > 1 else None,
            "per_round_sim_s": [round(r["round_s"] - float(r.get("eval_s") or 0.0), 3)
                                for r in train],
            "per_round_bare_s": [round(b, 3) for b in bare]}


# ------------------------------------------------------------------------- 2. launch parts

_PARTS = r"""
import json, os, sys, time, tempfile
t = time.perf_counter(); import fedlora.client_app; imp = time.perf_counter() - t
from fedlora.tasks.data import load_images, _partitions
t = time.perf_counter(); tr = load_images("fashion-mnist", "", "train"); load = time.perf_counter() - t
labels = tuple(int(v) for v in tr.y)
os.environ["FEDLORA_PARTITION_CACHE"] = tempfile.mkdtemp()
t = time.perf_counter(); _partitions(labels, 10, "dirichlet", 0.5, 1, 2); comp = time.perf_counter() - t
_partitions.cache_clear()
t = time.perf_counter(); _partitions(labels, 10, "dirichlet", 0.5, 1, 2); cached = time.perf_counter() - t
from fedlora.config import RunConfig
from fedlora.tasks import make_task
cfg = RunConfig.from_run_config(json.loads(sys.argv[1]))
t = time.perf_counter(); task = make_task(cfg); task.new_model(adapter=False); model = time.perf_counter() - t
print(json.dumps({"import_client_app_s": imp, "load_fashion_mnist_s": load,
                  "partition_compute_s": comp, "partition_cached_s": cached,
                  "task_and_model_s": model}))
"""


def launch_parts() -> dict:
    out = subprocess.run([sys.executable, "-c", _PARTS, json.dumps(OVERHEAD)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- 3. many nodes


_ENGINE = r"""
import json, sys, time
from flwr.server.superlink.fleet.vce import vce_api as V
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
n, app = int(sys.argv[1]), sys.argv[2]
sf = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
t = time.perf_counter(); m = V._register_nodes(n, sf); reg = time.perf_counter() - t
t = time.perf_counter(); V._register_node_info_stores(m, Run.create_empty(1), app_dir=app)
ctx = time.perf_counter() - t
st = sf.state()
t = time.perf_counter()
for node in m:
    st.get_message_ins(node_id=node, limit=1)
sweep = time.perf_counter() - t
print(json.dumps({"register_nodes_s": reg, "register_contexts_s": ctx, "poll_sweep_s": sweep}))
"""


def engine_parts(n: int) -> dict:
    """Flower's own start-up work for ``n`` nodes, timed in a fresh process with Flower 1.41's
    simulation-engine functions: registering the nodes, their Contexts (each reads the app's
    config from its directory), and one sweep of the engine's poll over every node's inbox
    (it sweeps every 0.1 s)."""
    out = subprocess.run([sys.executable, "-c", _ENGINE, str(n), str(ROOT)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def many_nodes(n: int, work: Path) -> dict:
    rc = {**MANY, "min-available-nodes": n, "fraction-train": min(1.0, 10 / n)}
    with PeakMemory() as mem:
        recs, wall = simulate(rc, n, work)
    by = {r["round"]: r for r in recs}
    delta = mem.peak - mem.before
    return {"nodes": n, "flower_engine_parts": engine_parts(n), "launcher_wall_s": wall, "round0_wall_s": by[0]["wall_s"],
            "round1_wall_s": by[1]["wall_s"], "round1_s": by[1]["round_s"],
            "later_rounds_s": [by[r]["round_s"] for r in sorted(by) if r >= 2],
            "memory_before_mb": mem.before, "memory_peak_mb": mem.peak,
            "memory_delta_mb": delta}


def render(result: dict) -> list[str]:
    """The report's lines, from the measured ``result`` (also ``--render`` of a scale.json)."""
    lines = []
    if result.get("whatif_flower_config_cache"):
        lines.append("WHAT-IF: Flower's engine parsing the app's pyproject.toml once instead of "
                     "once per node (benchmarks/whatif_flower_config_cache, not Flower 1.41 "
                     "as shipped, not used by fedlora)")
    p = result["launch_parts"]
    lines.append("launch parts (fresh process): " + ", ".join(f"{k} {v:.2f}" for k, v in p.items()))
    o = result.get("overhead")
    if o:
        lines.append(
            f"Flower overhead: simulation {o['simulation_train_s']:.1f} s vs bare local training "
            f"{o['bare_train_s']:.1f} s over rounds {o['rounds_compared'][0]}.."
            f"{o['rounds_compared'][-1]} = {o['ratio']:.2f}x (target <= 1.2x: "
            f"{'met' if o['ratio'] <= 1.2 else 'NOT met'}); central evaluation "
            f"{o['eval_s_total']:.1f} s separately; round 1 {o['round1_s']:.1f} s")
    many = result.get("many_nodes", [])
    for m in many:
        n = m["nodes"]
        lines.append(
            f"{n:>7,} nodes: round 1 done {m['round1_wall_s']:.1f} s after the ServerApp "
            f"started ({m['launcher_wall_s']:.0f} s whole run), later rounds "
            f"{', '.join(f'{s:.1f}' for s in m['later_rounds_s'])} s; memory +"
            f"{m['memory_delta_mb']:.0f} MB"
            + (f" (target round 1 <= 60 s: {'met' if m['round1_wall_s'] <= 60 else 'NOT met'})"
               if n >= 100000 else ""))
        lines.append("         Flower's engine start for them: " + ", ".join(
            f"{k} {v:.2f}" for k, v in m["flower_engine_parts"].items()))
    if len(many) >= 2:  # what one more node costs: the fixed part (Ray, actors) cancels
        lo, hi = min(many, key=lambda m: m["nodes"]), max(many, key=lambda m: m["nodes"])
        per = 1024 * (hi["memory_delta_mb"] - lo["memory_delta_mb"]) / (hi["nodes"] - lo["nodes"])
        lines.append(f"memory per node (marginal, {lo['nodes']:,} -> {hi['nodes']:,} nodes): "
                     f"{per:.1f} KB")
    lines.append(f"load average {result['load_average_start']:.2f} at the start, "
                 f"{result['load_average_end']:.2f} at the end")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="*", default=[1000, 10000, 100000])
    ap.add_argument("--overhead-rounds", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "results" / "scale"))
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--render", action="store_true", help="rewrite scale.txt from scale.json")
    ap.add_argument("--whatif-flower-config-cache", action="store_true",
                    help="Flower's engine parses pyproject.toml once, not once per node "
                         "(benchmarks/whatif_flower_config_cache; a what-if, not fedlora)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.render:
        result = json.loads((out / "scale.json").read_text())
        (out / "scale.txt").write_text("\n".join(render(result)) + "\n")
        print((out / "scale.txt").read_text(), end="")
        return 0
    work = ROOT / "runs" / ".scale"
    result: dict = {"command": "python benchmarks/scale.py " + " ".join(argv or sys.argv[1:]),
                    "load_average_start": os.getloadavg()[0],
                    "whatif_flower_config_cache": a.whatif_flower_config_cache}
    if a.whatif_flower_config_cache:  # inherited by the SuperLink, flwr-simulation and Ray
        patch = str(ROOT / "benchmarks" / "whatif_flower_config_cache")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [patch] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    result["launch_parts"] = launch_parts()
    print(f"launch parts: {result['launch_parts']}", flush=True)
    if not a.skip_overhead:
        result["overhead"] = overhead(a.overhead_rounds, work)
        print(f"overhead: {result['overhead']}", flush=True)
    result["many_nodes"] = []
    for n in a.nodes:
        result["many_nodes"].append(many_nodes(n, work))
        print(f"nodes: {result['many_nodes'][-1]}", flush=True)
    result["load_average_end"] = os.getloadavg()[0]
    (out / "scale.json").write_text(json.dumps(result, indent=2))
    lines = render(result)
    (out / "scale.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
