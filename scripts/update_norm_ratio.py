"""Honest update norms against the global's norm, per round and method: what the trusted norm
bound's round-1 fallback (``norm-bound-global`` × the global's norm, docs/hostile-nodes.md) has
to leave alone.

    python scripts/update_norm_ratio.py [key=value ...]   # run-config overrides, TOML values

Runs fedavg (upload=delta), flocora, lora-a2 (r8) and FLASC for 2 rounds on 3 in-process nodes
(the real ServerApp ``run`` and ClientApp functions through ``tests/conftest.py``'s
InProcessGrid, the committed Fashion-MNIST sample, 2 sampled a round) at the vision preset's
lr 0.05 and 2 local epochs, and prints each round's valid update norms, the global's norm, their
largest ratio and the bound the round used."""

from __future__ import annotations

import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = {"num-server-rounds": 2, "feature-maps": 16, "augment": False, "local-epochs": 2,
        "lr": 0.05, "max-examples-per-client": 1000, "dataset": "npz", "partitioner": "iid",
        "client-threads": 1, "device": "cpu", "seed": 7, "fraction-train": 0.67,
        "min-train-nodes": 2, "min-available-nodes": 3, "eval-max-examples": 64,
        "batch-size": 32}
METHODS = [("fedavg", {"upload": "delta"}), ("flocora", {}), ("lora-a2", {"lora-rank": 8}),
           ("flasc", {})]


def main(argv: list[str]) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from flwr.supercore.task_identity import TaskIdentity

    from conftest import SAMPLE, InProcessGrid
    from fedlora.config import RunConfig
    from fedlora.server_app import run
    from fedlora.strategies import base, guard

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    sets = {k: tomllib.loads(f"v = {v}")["v"] for k, _, v in (a.partition("=") for a in argv)}
    real = base.FedLoraStrategy.round_norm_bound

    def probe(self, rnd, norms):
        bound = real(self, rnd, norms)
        g = guard.update_norm(self._global)
        print(f"{self.name:8s} round {rnd}: norms {[f'{n:.4g}' for n in norms]}, global "
              f"{g:.4g}, largest ratio {max(norms) / g:.3f}, bound {bound:.4g}", flush=True)
        return bound

    base.FedLoraStrategy.round_norm_bound = probe
    with tempfile.TemporaryDirectory() as tmp:
        for m, extra in METHODS:
            rc = {**BASE, **extra, **sets, "method": m, "data-dir": str(SAMPLE), "run-dir": tmp,
                  "run-name": m}
            run(InProcessGrid(rc), RunConfig.from_run_config(rc))


if __name__ == "__main__":
    main(sys.argv[1:])
