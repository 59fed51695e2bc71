"""vNMSE of the value codecs on real update tensors (issue 32): ``||decode(encode(x)) - x||^2 /
||x||^2`` of whole updates, and the payload's bits a value, for the rotated codecs against the
per-tensor ones at comparable bits.

    python benchmarks/vnmse.py [--out results/vnmse] [--keys 5] [--clients 4]

Updates: one local training pass (``local-epochs`` 1 from the same initial model, the suites'
optimizer settings) of ``--clients`` clients each, for three shapes of what travels:
``resnet8-full`` (ResNet-8 width 16 on Fashion-MNIST, the whole model: fedavg's upload),
``resnet8-lora4`` (the same with rank-4 LoRA on every conv: FLoCoRA's adapter) and
``minilm-lora4`` (MiniLM-L6 with rank-4 LoRA on BBC News, offline: FL+LoRA's adapter). Each
update is encoded once per codec (``--keys`` codec keys for ``drive`` / ``eden``, whose error
depends on the key) with the table as a digest (payload format 2, the runs' default).
Columns: ``bits/value`` = 8 x payload bytes / values (header included), ``vNMSE`` = the mean
over updates and keys, ``tensor NMSE`` = the mean over tensors of each tensor's own squared
error over its squared norm (what a per-tensor scale bounds and a rotation of the concatenation
does not). Writes ``<out>/vnmse.json`` and ``<out>/vnmse.md``; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPECS = ["eden:0.25", "eden:0.25:mse", "eden:0.25:mse:tensor", "eden:0.5", "eden:0.5:mse",
         "eden:0.5:mse:tensor", "drive", "drive:mse", "drive:tensor", "drive:mse:tensor",
         "eden:2", "eden:2:mse", "eden:2:mse:tensor", "sign", "sign:tensor", "affine:1",
         "affine:2", "affine:1|zstd", "affine:2|zstd", "topk:0.1|sign|zstd",
         "topk:0.03|affine:4|zstd", "topk:0.01|affine:4|zstd"]
VISION = {"dataset": "fashion-mnist", "model": "resnet8", "feature-maps": 16,
          "augment": False, "partitioner": "dirichlet", "dirichlet-alpha": 0.5,
          "max-examples-per-client": 300, "batch-size": 32, "lr": 0.05, "local-epochs": 1,
          "seed": 1}
CASES = {
    "resnet8-full": ({**VISION, "method": "fedavg"}, False, 10),
    "resnet8-lora4": ({**VISION, "method": "flocora", "lora-rank": 4}, True, 10),
    "minilm-lora4": ({"task": "text", "model": "minilm", "dataset": "bbc-news", "lr": 5e-4,
                      "method": "fl-lora", "lora-rank": 4, "batch-size": 16, "max-length": 48,
                      "max-examples-per-client": 96, "partitioner": "dirichlet",
                      "dirichlet-alpha": 0.5, "local-epochs": 1, "seed": 1}, True, 6),
}


def updates(run_config: dict, adapter: bool, nodes: int, clients: int):
    """``clients`` real updates (trained - initial, float32, what travels) of one case."""
    import torch

    from fedlora.adapters import state_to_numpy, travelling_state
    from fedlora.config import RunConfig
    from fedlora.tasks import make_task

    torch.set_num_threads(2)
    task = make_task(RunConfig.from_run_config(run_config))
    model = task.new_model(adapter)
    init = {k: v.copy() for k, v in state_to_numpy(travelling_state(model)).items()}
    out = []
    for c in range(clients):
        m = copy.deepcopy(model)
        task.train(m, task.client_data(c, nodes), seed=100 + c)
        trained = state_to_numpy(travelling_state(m))
        out.append({k: (trained[k] - init[k]).astype(np.float32) for k in init})
    return out


def errors(spec: str, ups, keys: int) -> dict:
    from fedlora.compression import codec_key, parse_spec

    pipe0 = parse_spec(spec)
    nkeys = keys if pipe0.needs_key else 1
    vn, tn, bits = [], [], []
    for i, x in enumerate(ups):
        shapes = {k: v.shape for k, v in x.items()}
        n = sum(v.size for v in x.values())
        norm2 = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in x.values())
        for key in range(nkeys):
            pipe = pipe0.keyed(codec_key(key, 1, "up", i))
            payload = pipe.encode(x, by_digest=True)
            got = pipe.decode(payload, expected=shapes)
            err = {k: float(np.sum((got[k].astype(np.float64) - x[k]) ** 2)) for k in x}
            vn.append(sum(err.values()) / norm2)
            tn.append(np.mean([err[k] / max(float(np.sum(x[k].astype(np.float64) ** 2)),
                                            1e-300) for k in x if np.any(x[k])]))
            bits.append(8 * len(payload) / n)
    return {"spec": pipe0.spec, "bits_per_value": float(np.mean(bits)),
            "vnmse": float(np.mean(vn)), "vnmse_std": float(np.std(vn)),
            "tensor_nmse": float(np.mean(tn)), "samples": len(vn)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/vnmse")
    ap.add_argument("--keys", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args(argv)
    report = {"command": "python benchmarks/vnmse.py " + " ".join(argv or sys.argv[1:]),
              "specs": SPECS, "cases": {}}
    lines = []
    for name, (rc, adapter, nodes) in CASES.items():
        t0 = time.time()
        ups = updates(rc, adapter, nodes, args.clients)
        n = sum(v.size for v in ups[0].values())
        rows = [errors(spec, ups, args.keys) for spec in SPECS]
        report["cases"][name] = {"run_config": rc, "values": n, "tensors": len(ups[0]),
                                 "updates": len(ups), "rows": rows,
                                 "seconds": round(time.time() - t0, 1)}
        lines += [f"### {name}: {len(ups)} updates of {n:,} values in {len(ups[0])} tensors", "",
                  "| codec | bits/value | vNMSE | tensor NMSE |", "|---|---:|---:|---:|"]
        lines += [f"| `{r['spec']}` | {r['bits_per_value']:.3f} | {r['vnmse']:.3f} | "
                  f"{r['tensor_nmse']:.3f} |" for r in rows]
        lines.append("")
        print("\n".join(lines[-len(rows) - 5:]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vnmse.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "vnmse.md").write_text(f"`{report['command']}`\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
