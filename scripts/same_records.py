"""Fixed-seed records of every method, to check that a refactor changed no accuracy and no byte.

    python scripts/same_records.py dump <source tree> <out.json> [key=value ...]
    python scripts/same_records.py compare <before.json> <after.json> [--ignore KEY ...]
    python scripts/same_records.py twice <out dir> [--tree DIR] [--nodes N] [--load K] [key=value ...]
    python scripts/same_records.py runs <run dir> <run dir>

``twice`` runs one configuration twice through the real ``launch sim`` (default: ``./run``'s
preset, 5 rounds, evaluated every round), the second time with K busy-loop processes loading
the machine (started and stopped by PID), and ``runs`` compares two run folders: accuracy,
loss, payload bytes, counts and train metrics of every round, the per-node message bytes in
partition order, and every array of ``checkpoint.pt`` bit for bit; exit status 1 on any
difference. Message bytes (``bytes_*``) are compared within what Flower's node ids change:
a simulation draws them at random, and a message carries its node ids as varints.

Measured 2026-12-07 on 2 shared cores (load average ~10) with the default configuration (10
nodes): before 4ca2195 (replies summed in arrival order; two runs, the second beside a busy
loop, compared by ``runs``) round 1 was the same, round 2's replies arrived in another order and
its eval loss differed in the 8th digit, round 5 accuracy 0.5646 vs 0.5671, all checkpoint
arrays different; with 4ca2195 (``twice``, 2 busy loops) all 5 rounds identical (accuracy,
loss, payload bytes; message bytes within 2 B) and all 58 checkpoint arrays bit-identical.

Measured 2026-12-07 (issue 33: the typed round protocol, one weighted mean, one bounding step),
``dump`` of c7c55b3 and of the change, then ``compare``: every non-byte field identical and 0
bytes changed per message for all eight methods; the same with ``download="delta"
codec-down="affine:8"`` (the seven methods that take delta downloads) and with
``upload="delta" codec-up="eden:2"`` (the four weight-averaging methods: ``codec-key-id`` sent).

Measured 2026-12-07 (issue 34), ``dump . on.json`` against ``dump . off.json
norm-bound-history=0`` then ``compare off.json on.json --ignore norm_bound``: two replies a
round, so the trusted bound applies in every round and binds in none: every other non-byte
field identical for all eight methods, 0 bytes changed per message.

``dump`` runs each method for 3 rounds on 3 in-process nodes (the real ServerApp ``run`` and
ClientApp functions through ``tests/conftest.py``'s InProcessGrid, the committed Fashion-MNIST
sample, fixed seed) with the source tree given, and writes every round record without its
timings. ``compare`` prints every non-byte key whose value differs (exit status 1 if any) and,
per method, by how many bytes each message changed (an intended wire change shows as one
constant per direction).

Measured 2026-12-01, before = 25ada76 (the last session's end), after = wire v2 + records written
by the strategy + streaming aggregation: every non-byte field identical for all eight methods;
messages 5 bytes smaller down (``fp32``), 14 up (``affine:4|zstd``), 21 up (``ranks|affine:4|
zstd``): the spec no longer repeated in the Array stype."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

METHODS = ["fedavg", "flocora", "fl-lora", "ffa-lora", "flexlora", "hetlora", "lora-a2", "flasc"]
TIMING = {"round_s", "wall_s", "eval_s", "checkpoint_bytes"}
TINY = {"num-server-rounds": 3, "feature-maps": 8, "lora-rank": 4, "local-epochs": 1,
        "max-examples-per-client": 48, "batch-size": 16, "eval-max-examples": 64,
        "fraction-train": 0.67, "min-train-nodes": 2, "min-available-nodes": 3, "dataset": "npz",
        "partitioner": "iid", "client-threads": 1, "device": "cpu", "seed": 7,
        "codec-up": "affine:4|zstd"}


def dump(tree: Path, out: Path, overrides: dict | None = None) -> None:
    sys.path[:0] = [str(tree), str(tree / "tests")]
    from flwr.supercore.task_identity import TaskIdentity

    from conftest import SAMPLE, InProcessGrid
    from fedlora.config import RunConfig
    from fedlora.server_app import run

    import fedlora

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    assert Path(fedlora.__file__).resolve().is_relative_to(tree), fedlora.__file__
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in METHODS:
            rc = {**TINY, **(overrides or {}), "method": m, "data-dir": str(SAMPLE),
                  "run-dir": tmp, "run-name": m}
            run(InProcessGrid(rc), RunConfig.from_run_config(rc))
            recs = [json.loads(line) for line in (Path(tmp) / m / "rounds.jsonl").open()]
            result[m] = [{k: v for k, v in r.items() if k not in TIMING} for r in recs]
    out.write_text(json.dumps(result, indent=1, sort_keys=True))


BYTE_KEYS = {"bytes_down", "bytes_up", "cum_mb_down", "cum_mb_up", "cum_mb"}


def compare(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> int:
    """Print every non-byte difference (but in the keys ``ignore``), and per method the
    per-message byte changes."""
    before, after = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for m in METHODS:
        per_msg: dict[str, set[int]] = {"down": set(), "up": set()}
        if len(before[m]) != len(after[m]):
            bad += 1
            print(f"{m}: {len(before[m])} records -> {len(after[m])} (DIFFERS)")
        for ra, rb in zip(before[m], after[m]):
            for k in sorted(set(ra) | set(rb)):
                if (k in BYTE_KEYS or k.endswith("_per_node") or k in ignore
                        or ra.get(k) == rb.get(k)):
                    continue
                bad += 1
                print(f"{m} round {ra['round']}: {k}: {ra.get(k)!r} -> {rb.get(k)!r} (DIFFERS)")
            for d in ("down", "up"):
                xa = sorted((ra.get(f"bytes_{d}_per_node") or {}).values())
                xb = sorted((rb.get(f"bytes_{d}_per_node") or {}).values())
                per_msg[d] |= {y - x for x, y in zip(xa, xb)}
        print(f"{m}: bytes per message down {sorted(per_msg['down'])}, "
              f"up {sorted(per_msg['up'])}")
    print("accuracy, loss, counts and every non-byte field identical" if not bad
          else f"{bad} non-byte differences")
    return 1 if bad else 0


ROOT = Path(__file__).resolve().parent.parent
#: ./run's preset (the configuration issue 30 saw change from run to run), 5 rounds, every one
#: evaluated
PRESET = {"method": "fedavg", "feature-maps": 16, "augment": False, "local-epochs": 2,
          "lr": 0.05, "lr-schedule": "cosine", "num-server-rounds": 5,
          "max-examples-per-client": 1000, "upload": "delta", "download": "delta",
          "codec-up": "affine:4|zstd", "codec-down": "affine:4|zstd", "eval-every": 1}
#: per round: what must be identical
SAME = ("accuracy", "loss", "clients", "failures", "dropped", "payload_down", "payload_up",
        "params_up", "full_downloads", "partitions", "train_metrics", "analytic_bytes_up",
        "norm_bound", "clipped", "rejected")
#: a message's node ids (src and dst, reply_to's too) are varints of random 64-bit ids
NODE_ID_SLACK = 4 * 9


def twice(out: Path, tree: Path, nodes: int, load: int, overrides: list[str]) -> int:
    """Run the configuration twice (the second under ``load`` busy loops), then :func:`runs`."""
    import subprocess

    from fedlora.launch import _parse_kv, toml_value

    cfg = {**PRESET, **_parse_kv(overrides)}
    out.mkdir(parents=True, exist_ok=True)
    dirs = []
    for i, busy in ((1, 0), (2, load)):
        name = f"run-{i}"
        args = [f"{k}={toml_value(v)}" for k, v in {
            **cfg, "run-dir": str(out), "run-name": name}.items()]
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(busy)]
        try:
            print(f"{name}: {nodes} nodes, {busy} busy loops", flush=True)
            res = subprocess.run([sys.executable, "-m", "fedlora.launch", "sim", "--nodes",
                                  str(nodes), "--work-dir", str(out / f"flwr-{i}"), *args],
                                 cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        finally:
            for h in hogs:       # by PID: only the processes started here
                h.kill()
                h.wait()
        (out / f"{name}.log").write_text(res.stdout)
        if res.returncode != 0:
            print(f"{name} failed (exit {res.returncode}); log: {out / f'{name}.log'}")
            return 2
        dirs.append(out / name)
    return runs(*dirs)


def runs(a: Path, b: Path) -> int:
    """Every round of two run folders, and their final ``checkpoint.pt``; 1 if they differ."""
    import torch

    ra, rb = ([json.loads(line) for line in (d / "rounds.jsonl").open()] for d in (a, b))
    bad = 0 if len(ra) == len(rb) else 1
    for x, y in zip(ra, rb):
        diff = [k for k in SAME if x.get(k) != y.get(k)]
        slack = 0
        for d in ("down", "up"):  # per node, in partition order (sent in that order)
            px = [x.get(f"bytes_{d}_per_node", {}).get(n) for n in x.get("tiers", {})]
            py = [y.get(f"bytes_{d}_per_node", {}).get(n) for n in y.get("tiers", {})]
            if len(px) != len(py) or None in px + py:
                diff.append(f"bytes_{d}_per_node")
            else:
                slack = max([slack] + [abs(u - v) for u, v in zip(px, py)])
        if slack > NODE_ID_SLACK:
            diff.append("message bytes")
        bad += bool(diff)
        print(f"round {x['round']}: acc {x.get('accuracy')} / {y.get('accuracy')}, loss "
              f"{x.get('loss')} / {y.get('loss')}, payload up {x.get('payload_up')} / "
              f"{y.get('payload_up')}, down {x.get('payload_down')} / {y.get('payload_down')}, "
              f"message bytes per node within {slack} B"
              + (f"  DIFFERS: {', '.join(diff)}" if diff else "  same"))
    import numpy as np

    # the runs' own files (weights_only=False: they hold numpy arrays besides tensors)
    ca, cb = (torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=False)
              for d in (a, b))
    ca, cb = ({f"{part}/{k}": np.asarray(v) for part in ("state_dict", "travelling")
               for k, v in c[part].items()} for c in (ca, cb))
    differ = [k for k in ca if k not in cb or ca[k].dtype != cb[k].dtype
              or ca[k].tobytes() != cb[k].tobytes()]
    differ += [k for k in cb if k not in ca]
    print(f"checkpoint.pt: {len(ca)} arrays, "
          + ("all bit-identical" if not differ else f"{len(differ)} differ: {differ[:5]}"))
    bad += bool(differ)
    print("SAME RECORDS" if not bad else "RECORDS DIFFER")
    return 1 if bad else 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "dump":
        import tomllib

        sets = {}
        for kv in sys.argv[4:]:   # run-config overrides, TOML values (norm-bound-history=0)
            k, _, v = kv.partition("=")
            sets[k] = tomllib.loads(f"v = {v}")["v"]
        dump(Path(sys.argv[2]).resolve(), Path(sys.argv[3]), sets)
    elif cmd == "compare":
        rest = sys.argv[4:]
        ignore = tuple(rest[i + 1] for i, x in enumerate(rest[:-1]) if x == "--ignore")
        raise SystemExit(compare(Path(sys.argv[2]), Path(sys.argv[3]), ignore))
    elif cmd == "runs":
        raise SystemExit(runs(Path(sys.argv[2]), Path(sys.argv[3])))
    elif cmd == "twice":
        import argparse

        ap = argparse.ArgumentParser(prog="same_records.py twice")
        ap.add_argument("out", type=Path)
        ap.add_argument("--tree", type=Path, default=ROOT, help="source tree to run")
        ap.add_argument("--nodes", type=int, default=10)
        ap.add_argument("--load", type=int, default=2, help="busy loops during the 2nd run")
        ap.add_argument("overrides", nargs="*", help="run-config key=value (TOML values)")
        ns = ap.parse_intermixed_args(sys.argv[2:])
        sys.path.insert(0, str(ns.tree.resolve()))
        raise SystemExit(twice(ns.out.resolve(), ns.tree.resolve(), ns.nodes, ns.load,
                               ns.overrides))
    else:
        raise SystemExit(f"usage: {__doc__.splitlines()[2].strip()} (or compare, twice, runs)")
