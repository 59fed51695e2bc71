"""Server aggregation of 100 uploads of a 2.3M-parameter adapter (ResNet-18 width 64, LoRA
r=64: 2,304,970 values, 9.2 MB in fp32), streamed (``stream-aggregation=true``: decode → check
→ add → free, one reply at a time) and decode-all (``false``), against the physical reference:
``np.add`` of the same 100 dense float32 arrays into one accumulator, measured in the same run.

    python benchmarks/aggregate.py [--replies 100] [--repeats 3] [--out results/aggregate]

Time: ``FedLoraStrategy.aggregate_train`` on 100 reply Messages (decoding, validation, weight
caps, norm bound, the method's server step; message construction and ``configure_train`` not
counted; each run gets reply Messages built anew from the payloads, as received), best of
``--repeats``. Ratio = aggregate time / reference time (lower is better).
Peak: the largest traced Python/numpy allocation during one ``aggregate_train`` (tracemalloc,
a separate run), as a multiple of the model's fp32 size; the issue-16 target is ≤ 3x the model
plus one reply (≤ 4x for these uploads) and ≤ 0.25 s (flocora/fl-lora ``affine:4``) / ≤ 0.4 s
(FLASC top-k). The load average is printed: a busy machine makes every time worse.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from collections import OrderedDict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from fedlora.adapters import state_to_numpy, travelling_state  # noqa: E402
from fedlora.config import RunConfig  # noqa: E402
from fedlora.methods import get_method  # noqa: E402
from fedlora.strategies.base import ADAPTER_KEY, METRICS_KEY, state_to_arrays  # noqa: E402
from fedlora.tasks import make_task  # noqa: E402
from fedlora.wire import by_digest, payload_record  # noqa: E402

MODEL = {"model": "resnet18", "feature-maps": 64, "lora-rank": 64}
CONFIGS = {  # name: (run config, streamed?) — what the issue measured, both paths
    "flocora affine:4 (streamed)": ({"method": "flocora", "codec-up": "affine:4"}, True),
    "flocora affine:4 (decode-all)": ({"method": "flocora", "codec-up": "affine:4",
                                       "stream-aggregation": False}, False),
    "fl-lora affine:4 (streamed)": ({"method": "fl-lora", "codec-up": "affine:4"}, True),
    "fl-lora Δ topk:0.1|affine:4 (streamed)": ({"method": "fl-lora", "upload": "delta",
                                               "codec-up": "topk:0.1|affine:4"}, True),
    "fl-lora Δ topk:0.1|affine:4 (decode-all)": ({"method": "fl-lora", "upload": "delta",
                                                 "codec-up": "topk:0.1|affine:4",
                                                 "stream-aggregation": False}, False),
    "flasc top-k 0.1 (streamed)": ({"method": "flasc", "density-up": 0.1,
                                    "server-opt": "avg"}, True),
    "flasc top-k 0.1 (decode-all)": ({"method": "flasc", "density-up": 0.1,
                                      "server-opt": "avg", "stream-aggregation": False}, False),
}
TARGET_S = {"flocora affine:4 (streamed)": 0.25, "fl-lora affine:4 (streamed)": 0.25,
            "flasc top-k 0.1 (streamed)": 0.4}


class Nodes:
    """A Grid of ``n`` nodes for ``client-sampling=flower`` (no queries are sent)."""

    def __init__(self, n: int) -> None:
        self.ids = list(range(1, n + 1))

    def get_node_ids(self):
        return list(self.ids)


def strategy_for(rc: dict, n: int, shapes):
    cfg = RunConfig.from_run_config({**MODEL, **rc, "client-sampling": "flower",
                                     "fraction-train": 1.0, "min-train-nodes": n,
                                     "min-available-nodes": n})
    return get_method(cfg.method).Strategy(cfg, shapes)


def replies_for(rc: dict, n: int, glob: "OrderedDict[str, np.ndarray]", shapes):
    """One honest reply per node (its update: ~1e-3 noise) in the codec the server asks."""
    s = strategy_for(rc, n, shapes)
    msgs = list(s.configure_train(1, state_to_arrays(glob), ConfigRecord(), Nodes(n)))
    rng = np.random.default_rng(0)
    out = []
    for m in msgs:
        node = m.metadata.dst_node_id
        up = OrderedDict()
        for k, shape in s.upload_shapes(1).items():
            d = (1e-3 * rng.standard_normal(shape)).astype(np.float32)
            up[k] = d if s.replies_are_deltas else glob[k] + d
        out.append((m, s.upload_pipeline(1, node).encode(  # as a node encodes it
            up, by_digest=by_digest(s.cfg.payload_table))))
    return out


def fresh(replies):
    """Reply Messages built anew from the payloads, as the ServerApp receives them (nothing
    Flower caches on an Array — its chunk ids — carried over from an earlier run)."""
    return [Message(RecordDict({ADAPTER_KEY: payload_record(payload), METRICS_KEY: MetricRecord(
        {"num-examples": 100, "train-loss": 1.0})}), reply_to=m) for m, payload in replies]


def aggregate_once(rc: dict, n: int, glob, shapes, replies, trace: bool = False):
    s = strategy_for(rc, n, shapes)
    list(s.configure_train(1, state_to_arrays(glob), ConfigRecord(), Nodes(n)))
    replies = fresh(replies)
    if trace:
        tracemalloc.start()
    t = time.perf_counter()
    arrays, _ = s.aggregate_train(1, replies)
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] if trace else 0
    if trace:
        tracemalloc.stop()
    rec = s.round_record(1)
    assert arrays is not None and rec["clients"] == n, rec
    return dt, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replies", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results" / "aggregate"))
    ap.add_argument("--only", nargs="*", default=None,
                    help="configurations whose name starts with one of these (a quick look; "
                         "writes nothing)")
    a = ap.parse_args(argv)
    import logging

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # Message() outside an app
    logging.getLogger("flwr.fedlora").setLevel(logging.WARNING)
    cfg = RunConfig.from_run_config({**MODEL, "method": "flocora"})
    glob = state_to_numpy(travelling_state(make_task(cfg).new_model(adapter=True)))
    shapes = OrderedDict((k, tuple(v.shape)) for k, v in glob.items())
    size = sum(v.size for v in glob.values())
    model_bytes = 4 * size

    rng = np.random.default_rng(1)  # the physical reference: np.add of 100 dense arrays
    dense = [rng.standard_normal(size, dtype=np.float32) for _ in range(a.replies)]
    ref_times = []
    for _ in range(a.repeats + 1):
        acc = np.zeros(size, np.float32)
        t = time.perf_counter()
        for x in dense:
            np.add(acc, x, out=acc)
        ref_times.append(time.perf_counter() - t)
    ref = min(ref_times[1:])
    del dense
    load_start = os.getloadavg()[0]
    print(f"{a.replies} uploads of {size:,} values ({model_bytes / 1e6:.1f} MB fp32); "
          f"reference np.add of {a.replies} dense arrays: {ref:.3f} s; "
          f"load average {load_start:.2f}", flush=True)
    rows = []
    for name, (rc, streamed) in CONFIGS.items():
        if a.only is not None and not any(name.startswith(o) for o in a.only):
            continue
        replies = replies_for(rc, a.replies, glob, shapes)
        aggregate_once(rc, a.replies, glob, shapes, replies)  # warm-up (numba, caches)
        times = [aggregate_once(rc, a.replies, glob, shapes, replies)[0]
                 for _ in range(a.repeats)]
        _, peak = aggregate_once(rc, a.replies, glob, shapes, replies, trace=True)
        reply_bytes = int(np.mean([len(p) for _, p in replies]))
        row = {"config": name, "run_config": rc, "streamed": streamed,
               "seconds_min": min(times), "seconds_max": max(times),
               "ratio_vs_np_add": min(times) / ref, "peak_bytes": peak,
               "peak_x_model": peak / model_bytes, "reply_bytes": reply_bytes,
               "target_s": TARGET_S.get(name)}
        rows.append(row)
        print(line(row), flush=True)
    if a.only is not None:
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/aggregate.py", "replies": a.replies, "values": size,
              "model_bytes": model_bytes, "np_add_seconds": ref, "repeats": a.repeats,
              "load_average_start": load_start, "load_average": os.getloadavg()[0],
              "rows": rows}
    (out / "aggregate.json").write_text(json.dumps(result, indent=2))
    (out / "aggregate.txt").write_text("\n".join(render(result)) + "\n")
    return 0


def line(row: dict) -> str:
    """One configuration's printed line."""
    tgt = (f"  target ≤ {row['target_s']} s: "
           f"{'met' if row['seconds_min'] <= row['target_s'] else 'NOT met'}"
           if row["target_s"] else "")
    return (f"{row['config']:44s} {row['seconds_min']:.3f} s (max {row['seconds_max']:.3f}) "
            f"= {row['ratio_vs_np_add']:.1f}x np.add | peak {row['peak_x_model']:.2f}x the "
            f"model | reply {row['reply_bytes'] / 1e6:.2f} MB{tgt}")


def render(result: dict) -> list[str]:
    """``aggregate.txt``: what the run printed, from ``aggregate.json``."""
    size, reps = result["values"], result["replies"]
    load = result.get("load_average_start", result["load_average"])
    return [f"{reps} uploads of {size:,} values ({result['model_bytes'] / 1e6:.1f} MB fp32); "
            f"reference np.add of {reps} dense arrays: {result['np_add_seconds']:.3f} s; "
            f"load average {load:.2f}"] + [line(r) for r in result["rows"]]


if __name__ == "__main__":
    raise SystemExit(main())
