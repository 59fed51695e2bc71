"""Centralized reference for a suite: what federation costs.

The suite's model (the full network, as FedAvg trains it) is trained on the pooled data of all
its clients (each client's examples exactly as the federated run loads them: same partitioner,
same per-client cap), for the **same number of examples seen** as one federated run
(rounds × clients per round × examples per client × local epochs), with the same batch size,
optimizer and per-round learning-rate schedule, and evaluated on the same test set. One round
here = one pass of that many examples drawn at random from the pool. Three seeds like the suite.

    python benchmarks/centralized.py vision-conv      # writes results/<suite>/centralized.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


def reference_config(spec: dict) -> dict:
    """The run config of the reference: the suite's ``centralized`` entry names a config."""
    return dict(spec["runs"][spec["centralized"]])


def train_reference(rc: dict, nodes: int, seed: int) -> dict:
    import torch

    from fedlora.config import RunConfig
    from fedlora.tasks import make_task

    cfg = RunConfig.from_run_config({**rc, "seed": seed})
    task = make_task(cfg)
    torch.manual_seed(seed)
    parts = [task.client_data(p, nodes) for p in range(nodes)]
    x = _cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    per_round = max(int(cfg.fraction_train * nodes), cfg.min_train_nodes)
    cap = cfg.max_examples_per_client or int(np.ceil(len(y) / nodes))
    model = task.new_model(adapter=rc.get("method", "fedavg") != "fedavg")
    rng = np.random.default_rng([seed, 7])
    t0, seen = time.time(), 0
    for rnd in range(1, cfg.num_server_rounds + 1):
        idx = torch.from_numpy(rng.choice(len(y), size=min(per_round * cap, len(y)),
                                          replace=False))
        task.train(model, (_take(x, idx), y[idx]), seed=seed * 1000 + rnd, lr=cfg.lr_at(rnd))
        seen += len(idx) * cfg.local_epochs
    metrics = task.evaluate(model, task.test_data())
    return {"seed": seed, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
            "examples_seen": seen, "pool": int(len(y)), "train_s": round(time.time() - t0, 1)}


def _cat(xs):
    """Concatenate client inputs: tensors (vision) or dicts of tensors (text: input ids and
    attention masks, padded to the same max-length)."""
    import torch

    if isinstance(xs[0], dict):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
    return torch.cat(xs)


def _take(x, idx):
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def run_reference(spec: dict, out: Path, force: bool = False) -> dict:
    """Train the reference for every seed of the suite (resumable: finished seeds are kept)."""
    path = out / "centralized.json"
    done = json.loads(path.read_text()) if path.exists() and not force else {"seeds": []}
    rc = reference_config(spec)
    have = {r["seed"] for r in done["seeds"]}
    for seed in spec.get("seeds", [rc.get("seed", 42)]):
        if seed in have:
            continue
        print(f"[centralized] {spec['centralized']} pooled, seed {seed}", flush=True)
        done["seeds"].append(train_reference(rc, spec["nodes"], seed))
        accs = [r["accuracy"] for r in done["seeds"]]
        done.update({"config": spec["centralized"], "run_config": rc,
                     "accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
                     "command": "python benchmarks/run.py <suite> --only centralized"})
        path.write_text(json.dumps(done, indent=2))
        print(f"[centralized] seed {seed}: accuracy {done['seeds'][-1]['accuracy']:.4f}",
              flush=True)
    return done


def main(argv=None) -> int:
    from benchmarks.suites import SUITES

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(k for k, v in SUITES.items()))
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    spec = SUITES[a.suite]()
    if not spec.get("centralized"):
        ap.error(f"suite {a.suite} names no centralized reference")
    out = ROOT / "results" / a.suite
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run_reference(spec, out, a.force), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
