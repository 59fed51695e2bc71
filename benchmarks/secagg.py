"""What secure aggregation costs: bytes per node per round and compute time, against the same
upload without it.

    python benchmarks/secagg.py [--nodes 10,100,1000] [--dim 65536] [--bits 16] \
        [--apps-nodes 10] [--out results/secagg]

Two measurements, both written to ``--out`` (``secagg.json`` and ``secagg.txt``):

* **protocol** (n = 10 / 100 / 1,000): every node's :class:`fedlora.secagg.ClientSession` and the
  server's :class:`~fedlora.secagg.ServerSession` in one process (``fedlora.secagg.local``), one
  round of ``--dim`` coordinates, SecAgg+ neighbours 2⌈log2 n⌉+2 (everyone at n = 10), threshold
  a strict majority of each neighbourhood; with no dropout and with 5 % of the nodes (at least
  one) lost after sharing their keys, before sending masked input (their pairwise masks
  recovered; the sum is checked equal to the survivors' plain sum). Bytes are the protocol's messages (setup = advertise
  + share stages, both ways; masked input = the routed shares down + the k-bit vector up; unmask
  = request + revealed shares), without Flower's message envelope; the plain upload they are
  compared with is fedlora's ``fp32`` and ``affine:8`` payload (its widest) of the same ``--dim`` values
  (``wire.encode_record``). Times: each node's compute (mean over nodes) and the server's, on
  this machine, one process.
* **apps** (``--apps-nodes``, default 10): the real ServerApp ``run`` and ClientApp functions over
  an in-process grid (every message built, measured with ``wire.message_bytes`` as in a
  deployment, but not sent over a network), a tiny vision model (ResNet-8 width 8, LoRA r = 4,
  32 examples a node, the committed Fashion-MNIST sample), one round of flocora (after one
  unreported warm-up round: imports and caches) of each of ``--apps-methods`` (flocora with
  ``upload=delta``, weighted; lora-a2 at rank-budget 1 of rank 16, also with
  ``secagg-rank-union``), plain ``fp32`` vs ``secure-aggregation`` at ``--bits``: the round record's
  bytes per node both ways (Flower messages, secure-aggregation stages included) and the
  round's wall time (``round_s``: training included; median of ``--repeats`` runs of each,
  alternated).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedlora.secagg import Params, auto_degree, auto_threshold, ring  # noqa: E402
from fedlora.secagg.local import STAGES, LocalRound  # noqa: E402


def plain_payload(dim: int, spec: str) -> int:
    from fedlora.wire import encode_record, payload_bytes

    # one 2-D tensor (fedlora's codecs keep 1-D tensors, biases, in fp32)
    x = np.random.default_rng(0).standard_normal((1, dim)).astype(np.float32) * 1e-3
    return payload_bytes(encode_record(OrderedDict(update=x), spec))


def protocol_row(n: int, dim: int, bits: int, drop: float) -> dict:
    degree = auto_degree(n)
    p = Params(os.urandom(16), n, degree, auto_threshold(degree, 0.5), bits,
               ring.ring_bits(bits, n), 1.0, dim, 12345)
    rng = np.random.default_rng(n)
    lv = ring.levels(bits)
    q = _Updates(n, dim, lv)
    lost = max(1, int(round(drop * n))) if drop > 0 else 0
    # lost after sharing their keys, before sending masked input: the server reconstructs their
    # mask keys and removes the pairwise masks their neighbours added (the costly recovery)
    stop = {int(i): "masked" for i in rng.choice(n, lost, replace=False)} if lost else {}
    lr = LocalRound(p)
    t0 = time.perf_counter()
    out = lr.run(q, stop, rng)
    wall = time.perf_counter() - t0
    want = np.zeros(dim, np.int64)
    for i in range(n):
        if i not in stop:
            want += q[i]
    assert np.array_equal(out, want), "unmasked sum differs from the plain sum"

    def mean(d: dict) -> float:
        return float(np.mean(list(d.values()))) if d else 0.0

    per = {s: mean(lr.down[s]) + mean(lr.up[s]) for s in STAGES}
    return {
        "nodes": n, "dim": dim, "bits": bits, "ring_bits": p.ring_bits, "degree": degree,
        "threshold": p.threshold, "lost_after_sharing": lost,
        "setup_bytes": per["advertise"] + per["share"],
        "masked_down_bytes": mean(lr.down["masked"]), "masked_up_bytes": mean(lr.up["masked"]),
        "unmask_bytes": per["unmask"],
        "total_bytes": sum(per.values()),
        "node_s": mean(lr.client_s), "server_s": lr.server_s, "wall_s": wall,
    }


class _Updates(dict):
    """Node i's quantized update, made when asked (1,000 × 65,536 int64 would be 0.5 GB)."""

    def __init__(self, n: int, dim: int, lv: int) -> None:
        super().__init__((i, None) for i in range(n))
        self.dim, self.lv = dim, lv

    def __getitem__(self, i: int) -> np.ndarray:
        return np.random.default_rng([7, i]).integers(-self.lv, self.lv + 1, self.dim)


class _Grid:
    """Every message delivered at once to the real ClientApp functions in this process."""

    def __init__(self, rc: dict, n: int) -> None:
        from flwr.app import Context, RecordDict

        self.ctx = {100 + i: Context(run_id=1, node_id=100 + i, node_config={
            "partition-id": i, "num-partitions": n, "data-dir": rc["data-dir"]},
            state=RecordDict(), run_config=rc) for i in range(n)}

    def get_node_ids(self):
        return list(self.ctx)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import MessageType

        from fedlora import client_app

        out = []
        for m in list(messages):
            node, kind = m.metadata.dst_node_id, m.metadata.message_type
            f = (client_app.train if kind == MessageType.TRAIN else client_app.secagg
                 if kind == f"{MessageType.QUERY}.secagg" else client_app.query)
            reply = f(m, self.ctx[node])
            reply.metadata.__dict__["_src_node_id"] = node
            out.append(reply)
        return out


#: the apps part's methods: flocora (rank 4, weighted secure mean) and lora-a2 (rank-budget 1
#: of rank 16, LoRA-A2's low-budget regime: plain uploads carry the selected rank slices only,
#: secure ones the whole trained factor, or with secagg-rank-union the union of the selections)
APPS_METHODS = {"flocora": {"method": "flocora"},
                "lora-a2": {"method": "lora-a2", "upload": "weights", "lora-rank": 16,
                            "rank-budget": 1}}


def apps_rows(n: int, bits: int, repeats: int, methods: tuple[str, ...] = ("flocora",)
              ) -> list[dict]:
    from fedlora.config import RunConfig
    from fedlora.results import read_rounds
    from fedlora.server_app import run

    runs = {}
    for m in methods:
        runs[f"{m} plain fp32"] = APPS_METHODS[m]
        runs[f"{m} secure"] = {**APPS_METHODS[m], "secure-aggregation": True,
                               "secagg-bits": bits}
        if m == "lora-a2":
            runs[f"{m} secure rank-union"] = {**runs[f"{m} secure"], "secagg-rank-union": True}
    order = [("warm-up", {})] + [kv for _ in range(repeats) for kv in runs.items()]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, extra) in enumerate(order):
            rc = {"num-server-rounds": 1, "feature-maps": 8, "lora-rank": 4,
                  "local-epochs": 1, "max-examples-per-client": 32, "batch-size": 16,
                  "eval-max-examples": 32, "fraction-train": 1.0, "min-train-nodes": n,
                  "min-available-nodes": n, "dataset": "npz", "partitioner": "iid",
                  "client-threads": 1, "device": "cpu", "method": "flocora",
                  "upload": "delta", "update-norm-bound": 4.0, "norm-bound-factor": 0.0,
                  "max-weight-ratio": 0.0,
                  "data-dir": str(ROOT / "tests" / "data" / "fashion-mnist-sample"),
                  "run-dir": tmp, "run-name": f"run{k}", **extra}
            with _identity():
                run(_Grid(rc, n), RunConfig.from_run_config(rc))
            r = [x for x in read_rounds(Path(tmp) / rc["run-name"]) if x["round"] == 1][0]
            if name == "warm-up":  # first run: imports, data and model caches
                continue
            row = rows.setdefault(name, {
                "run": name, "nodes": n, "clients": r["clients"],
                "train_down_bytes": r["bytes_down"] / n, "train_up_bytes": r["bytes_up"] / n,
                "secagg_down_bytes": r.get("secagg_bytes_down", 0) / n,
                "secagg_up_bytes": r.get("secagg_bytes_up", 0) / n,
                "payload_up_bytes": r["payload_up"] / n,
                # masked coordinates, the weight included (rank union: the values session's)
                "coordinates": (r["secagg_values_coordinates"] + (1 if r["secagg_weight_cap"]
                                                                  else 0)
                                if "secagg_values_coordinates" in r
                                else r.get("secagg_coordinates")),
                "union_slices": r.get("secagg_union_slices"), "slices": r.get("secagg_slices"),
                "weight_cap": r.get("secagg_weight_cap"), "round_s_all": []})
            row["round_s_all"].append(r["round_s"])
    for row in rows.values():
        row["round_s"] = float(np.median(row["round_s_all"]))
    return list(rows.values())


def _identity():
    """Flower's Message() needs a run/node identity outside a running app (as the tests set)."""
    import contextlib

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    return contextlib.nullcontext()


def _slices(r: dict) -> str:
    return "" if r.get("slices") is None else f"{r['union_slices']} / {r['slices']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="10,100,1000")
    ap.add_argument("--dim", type=int, default=65536)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--drop", type=float, default=0.05)
    ap.add_argument("--apps-nodes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="apps: plain/secure runs alternated")
    ap.add_argument("--apps-methods", default="flocora,lora-a2",
                    help=f"apps: methods of {sorted(APPS_METHODS)}")
    ap.add_argument("--out", default=str(ROOT / "results" / "secagg"))
    a = ap.parse_args(argv)
    aff_spec = f"affine:{min(a.bits, 8)}"  # fedlora's affine codec goes to 8 bits
    fp32, aff = plain_payload(a.dim, "fp32"), plain_payload(a.dim, aff_spec)
    proto = []
    for n in [int(x) for x in a.nodes.split(",") if x]:
        for drop in (0.0, a.drop):
            row = protocol_row(n, a.dim, a.bits, drop)
            proto.append(row)
            print(json.dumps(row), flush=True)
    methods = tuple(x for x in a.apps_methods.split(",") if x)
    apps = apps_rows(a.apps_nodes, a.bits, a.repeats, methods) if a.apps_nodes else []
    for r in apps:
        print(json.dumps(r), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/secagg.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "secagg.json").write_text(json.dumps({
        "command": cmd.strip(), "plain_fp32_payload": fp32, f"plain_{aff_spec}_payload": aff,
        "protocol": proto, "apps": apps, "load_average": os.getloadavg()}, indent=1) + "\n")
    lines = [f"$ {cmd.strip()}", f"load average at the end: {os.getloadavg()[0]:.1f}", "",
             f"protocol level, {a.dim} coordinates, {a.bits} bits (plain upload payload: fp32 "
             f"{fp32} B, {aff_spec} {aff} B); bytes are means per node",
             "| nodes | neighbours | t | lost after sharing | k bits | setup B | masked input "
             "down B | masked input up B | unmask B | total B | total / fp32 | node s | server s |",
             "|" + "---|" * 13]
    for r in proto:
        lines.append(f"| {r['nodes']} | {r['degree']} | {r['threshold']} | "
                     f"{r['lost_after_sharing']} | {r['ring_bits']} | {r['setup_bytes']:.0f} | "
                     f"{r['masked_down_bytes']:.0f} | {r['masked_up_bytes']:.0f} | "
                     f"{r['unmask_bytes']:.0f} | {r['total_bytes']:.0f} | "
                     f"{r['total_bytes'] / fp32:.3f} | {r['node_s']:.3f} | {r['server_s']:.2f} |")
    if apps:
        lines += ["", f"real apps, in-process grid, {a.apps_nodes} nodes, one round "
                  f"(bytes per node, Flower messages; round s: median of {a.repeats} alternated "
                  "runs, training included; coordinates: masked, the weight included when W > 0)",
                  "| run | coordinates | W | rank slices (union / all) | train msg down B | "
                  "train reply up B | secagg stages down B | secagg stages up B | upload payload "
                  "B | round s |",
                  "|" + "---|" * 10]
        for r in apps:
            lines.append(f"| {r['run']} | {r['coordinates'] or ''} | "
                         f"{'' if r['weight_cap'] is None else r['weight_cap']} | "
                         f"{_slices(r)} | "
                         f"{r['train_down_bytes']:.0f} | "
                         f"{r['train_up_bytes']:.0f} | {r['secagg_down_bytes']:.0f} | "
                         f"{r['secagg_up_bytes']:.0f} | {r['payload_up_bytes']:.0f} | "
                         f"{r['round_s']:.2f} ({', '.join(f'{x:.2f}' for x in r['round_s_all'])}) |")
    (out / "secagg.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
