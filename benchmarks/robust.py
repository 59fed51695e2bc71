"""Cost of the robust aggregation options (``aggregation`` = mean | median | trimmed-mean) and of
the per-update guard, on the server step of one FLoCoRA round.

    python benchmarks/robust.py [--clients 20] [--repeats 5] [--out results/robust/robust.txt]

Setup: the FLoCoRA CIFAR-10 adapter (ResNet-8, 64 feature maps, LoRA rank 32 on every conv,
GroupNorm + fc trained: 258,026 parameters), ``--clients`` decoded uploads (global + N(0, 0.01)
noise), through the strategy's own code: ``bound_updates`` (weight caps + one L2 norm per update
against the global) then ``aggregate_updates`` (after ``robust_updates``). Each time is the best of
``--repeats`` runs after a warm-up. Bytes: the aggregation rule runs on the server after decoding,
so the messages are the same whatever the mode; the upload payload is measured per mode to show it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.codecs import best  # noqa: E402
from fedlora.adapters import state_to_numpy, travelling_state  # noqa: E402
from fedlora.compression import parse_spec  # noqa: E402
from fedlora.config import RunConfig  # noqa: E402
from fedlora.methods import get_method  # noqa: E402
from fedlora.strategies.base import ClientUpdate, RoundStats  # noqa: E402
from fedlora.tasks.vision import VisionModelConfig, build_model  # noqa: E402

MODES = ("mean", "median", "trimmed-mean")


def adapter_state() -> "OrderedDict[str, np.ndarray]":
    model = build_model(VisionModelConfig(), adapter=True)
    return state_to_numpy(travelling_state(model))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    g = adapter_state()
    n_params = sum(v.size for v in g.values())
    shapes = {k: v.shape for k, v in g.items()}
    rng = np.random.default_rng(0)
    uploads = [OrderedDict((k, (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32))
                           for k, v in g.items()) for _ in range(args.clients)]
    counts = rng.integers(200, 1000, size=args.clients).tolist()

    rows = {}
    for mode in MODES:
        s = get_method("flocora").Strategy(RunConfig(method="flocora", aggregation=mode), shapes)
        s._global = g

        def updates():
            return [ClientUpdate(i + 1, u, n, {}) for i, (u, n) in enumerate(zip(uploads, counts))]

        def guard_step():
            s.bound_updates(1, updates(), RoundStats(1))

        def aggregate():
            s.aggregate_updates(1, g, s.robust_updates(updates()))

        spec = s.expected_upload_spec(1, 1)
        rows[mode] = {"guard_s": best(guard_step, args.repeats),
                      "aggregate_s": best(aggregate, args.repeats),
                      "upload_payload_bytes": len(parse_spec(spec).encode(uploads[0])),
                      "codec_up": spec}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"robust aggregation cost: FLoCoRA adapter of {n_params:,} parameters, "
             f"{args.clients} uploads, best of {args.repeats} (load average {load:.2f}, "
             f"{os.cpu_count()} CPUs)",
             f"{'aggregation':<14}{'guard ms':>10}{'aggregate ms':>14}{'x mean':>9}"
             f"{'upload B/client':>17}"]
    base = rows["mean"]["aggregate_s"]
    for mode, r in rows.items():
        lines.append(f"{mode:<14}{1e3 * r['guard_s']:>10.1f}{1e3 * r['aggregate_s']:>14.1f}"
                     f"{r['aggregate_s'] / base:>9.2f}{r['upload_payload_bytes']:>17,}")
    same = len({r["upload_payload_bytes"] for r in rows.values()}) == 1
    lines.append(f"bytes: {'identical' if same else 'DIFFERENT'} in every mode (the rule runs on "
                 "the server after decoding; no message changes); guard = weight caps + one L2 "
                 "norm per update, paid in every mode")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
