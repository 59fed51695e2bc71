"""What one round costs a node, per method and codec (issue 38): peak RSS, CPU and wall seconds,
bytes down/up, and the node's persistent state, in memory and serialized.

    nice -n 10 python benchmarks/footprint.py [--rounds 2] [--only NAME ...] [--out results/footprint]

Each configuration is a run of a committed suite configuration (``benchmarks/suites.py``:
``vision-conv``, ``text-conv``, ``text-frontier``; same model, data, partitioning, local epochs,
batch size, examples per client, codecs) for ``--rounds`` rounds with ONE node, partition 0 of
the suite's node count, in its own child process (``benchmarks/nodeproc.py``): the real
ServerApp in this process sends every message through Flower's protobuf serde to the child,
which hands it to the real ClientApp (``fedlora.client_app:app``) and keeps the node's
``Context`` across rounds, as a SuperNode does. Per round the child reports:

* ``wall_s`` / ``cpu_s``: the ClientApp call (decode the download, train, encode the upload);
  CPU = user + system time of the node process (``resource.getrusage``);
* ``rss_peak_mb``: the node process's peak resident set so far (``VmHWM``; it only grows);
* ``down_kb`` / ``up_kb``: the serialized message each way (what a SuperNode receives/sends,
  Flower's envelope included);
* ``state_mem_kb``: the arrays the node keeps between rounds (``context.state``: error-feedback
  residuals, its copy of the global model for delta downloads); ``state_disk_kb``: that state
  serialized as Flower serializes a RecordDict (what persisting it would take).

The node's start (importing the ClientApp) is reported apart: ``start_s`` and ``start_rss_mb``.
Round 1 also carries the node's one-time work (loading and partitioning or tokenizing its data,
building the model), which later rounds reuse from the process's caches.
Central evaluation (server side) is cut to 100 test examples: it is not the node's cost. The
per-machine partition cache is filled before the nodes start, so no node computes partitions
(one that does also imports datasets/pyarrow for it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.nodeproc import run_with_nodes  # noqa: E402
from benchmarks.suites import SUITES  # noqa: E402

# (suite, run name): the methods and main codecs, on both tasks
CONFIGS = [
    ("vision-conv", "fedavg"),                 # full model, fp32 both ways
    ("vision-conv", "fedavg-q4"),              # 4-bit deltas both ways (node keeps the global)
    ("vision-conv", "fedavg-sparse0.02"),      # top-2 % + 4-bit + zstd, error feedback
    ("vision-conv", "fedavg-signt-ef"),        # 1-bit signs, error feedback
    ("vision-conv", "flocora-r16-q4"),         # LoRA r16, 4-bit
    ("vision-conv", "flocora-r4-sparse0.1"),   # LoRA r4, top-10 % + EF
    ("vision-conv", "flasc-r4-d0.1"),          # FLASC
    ("text-conv", "fl-lora-a0.5-r4"),
    ("text-conv", "ffa-lora-a0.5-r4"),
    ("text-conv", "flexlora-a0.5-r4"),
    ("text-conv", "lora-a2-a0.5-r4"),          # global rank 16, budget 4, delta downloads
    ("text-frontier", "fl-lora-r4-signt-ef"),  # banking77, 1-bit deltas both ways + EF
    ("text-frontier", "fedavg-full"),          # full fine-tuning of MiniLM, fp32
]


def config_for(suite: str, name: str, rounds: int, run_dir: str) -> tuple[dict, int]:
    spec = SUITES[suite]()
    rc = dict(spec["runs"][name])
    rc.update({"num-server-rounds": rounds, "fraction-train": 1.0, "min-train-nodes": 1,
               "min-available-nodes": 1, "eval-every": rounds, "eval-max-examples": 100,
               "run-dir": run_dir, "run-name": f"{suite}-{name}"})
    rc.setdefault("seed", 1)
    return rc, int(spec["nodes"])


def warm_partitions(rc: dict, num_partitions: int) -> int:
    """Fill the per-machine partition cache (as a previous run would have); returns the
    node's example count."""
    from fedlora.config import RunConfig
    from fedlora.tasks import make_task

    task = make_task(RunConfig.from_run_config(rc))
    return len(task.client_data(0, num_partitions)[1])


def measure(suite: str, name: str, rounds: int, run_dir: str) -> dict:
    rc, nodes = config_for(suite, name, rounds, run_dir)
    examples = warm_partitions(rc, nodes)
    t = time.time()
    summary, by_node = run_with_nodes(rc, 1, node_config={"partition-id": 0,
                                                          "num-partitions": nodes})
    (node,) = by_node.values()
    per_round = []
    for r in [r for r in node["reports"] if r["type"] == "train"]:
        per_round.append({
            "wall_s": round(r["wall_s"], 2), "cpu_s": round(r["cpu_s"], 2),
            "rss_peak_mb": round(r["rss_peak"] / 2**20, 1),
            "down_kb": round(r["bytes_down"] / 1024, 1), "up_kb": round(r["bytes_up"] / 1024, 1),
            "state_mem_kb": round(r["state_mem"] / 1024, 1),
            "state_disk_kb": round(r["state_disk"] / 1024, 1),
            "state": r["state_keys"], "train_steps": r["metrics"].get("train-steps"),
            "num_examples": r["metrics"].get("num-examples"), "threads": r["threads"],
            "modules": r["modules"]})
    return {"suite": suite, "name": name, "method": rc["method"],
            "codec_up": rc.get("codec-up", "fp32"), "codec_down": rc.get("codec-down", "fp32"),
            "upload": rc.get("upload", "weights"), "download": rc.get("download", "full"),
            "error_feedback": bool(rc.get("error-feedback", False)), "task": rc.get("task", "vision"),
            "partition": f"0 of {nodes}", "examples": examples,
            "start_s": round(node["start"]["import_s"], 2),
            "start_rss_mb": round(node["start"]["rss_peak"] / 2**20, 1),
            "rounds": per_round, "run_s": round(time.time() - t, 1),
            "final_accuracy": summary.get("final_accuracy")}


def table(rows: list[dict]) -> str:
    head = ("| task | configuration | method | up / down codec | round | wall s | CPU s | "
            "peak RSS MB | down KB | up KB | node state KB (mem / serialized) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        codec = row["codec_up"] if row["codec_up"] == row["codec_down"] else \
            f"{row['codec_up']} / {row['codec_down']}"
        if row["error_feedback"]:
            codec += " +EF"
        codec = f"`{codec}`".replace("|", "\\|")  # a pipe inside a table cell
        for i, r in enumerate(row["rounds"], 1):
            lines.append(
                f"| {row['task']} | {row['suite']}/{row['name'] if i == 1 else '〃'} | "
                f"{row['method'] if i == 1 else ''} | {codec if i == 1 else ''} | {i} | "
                f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['rss_peak_mb']:.0f} | "
                f"{r['down_kb']:.1f} | {r['up_kb']:.1f} | "
                f"{r['state_mem_kb']:.1f} / {r['state_disk_kb']:.1f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None,
                    help="configuration names (suite/name or name) to run; default all")
    ap.add_argument("--out", default=str(ROOT / "results" / "footprint"))
    args = ap.parse_args(argv)
    todo = [c for c in CONFIGS if not args.only or c[1] in args.only
            or f"{c[0]}/{c[1]}" in args.only]
    if not todo:
        ap.error(f"no configuration among {args.only}; known: {[f'{s}/{n}' for s, n in CONFIGS]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        for suite, name in todo:
            print(f"[footprint] {suite}/{name} ...", flush=True)
            rows.append(measure(suite, name, args.rounds, run_dir))
            r = rows[-1]["rounds"][-1]
            print(f"[footprint] {suite}/{name}: {r['wall_s']} s wall, {r['cpu_s']} s CPU, "
                  f"{r['rss_peak_mb']} MB peak RSS", flush=True)
    doc = {"command": "nice -n 10 python benchmarks/footprint.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "load_avg_start": load0, "load_avg_end": os.getloadavg()},
           "rounds": args.rounds, "configs": rows}
    (out / "footprint.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "footprint.md").write_text(
        f"# Client footprint per round\n\n`{doc['command'].strip()}`; {os.cpu_count()} CPUs, "
        f"load average {load0[0]:.2f} at the start, {doc['machine']['load_avg_end'][0]:.2f} at "
        "the end (wall and CPU seconds stretch on a loaded machine).\n\n" + table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
