"""Fixed-seed records of every method, to check that a refactor changed no accuracy and no byte.

    python scripts/same_records.py dump <source tree> <out.json>   # run every method there
    python scripts/same_records.py compare <before.json> <after.json>

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


def dump(tree: Path, out: Path) -> None:
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
            rc = {**TINY, "method": m, "data-dir": str(SAMPLE), "run-dir": tmp, "run-name": m}
            run(InProcessGrid(rc), RunConfig.from_run_config(rc))
            recs = [json.loads(line) for line in (Path(tmp) / m / "rounds.jsonl").open()]
            result[m] = [{k: v for k, v in r.items() if k not in TIMING} for r in recs]
    out.write_text(json.dumps(result, indent=1, sort_keys=True))


BYTE_KEYS = {"bytes_down", "bytes_up", "cum_mb_down", "cum_mb_up", "cum_mb"}


def compare(a: Path, b: Path) -> int:
    """Print every non-byte difference, and per method the per-message byte changes."""
    before, after = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for m in METHODS:
        per_msg: dict[str, set[int]] = {"down": set(), "up": set()}
        if len(before[m]) != len(after[m]):
            bad += 1
            print(f"{m}: {len(before[m])} records -> {len(after[m])} (DIFFERS)")
        for ra, rb in zip(before[m], after[m]):
            for k in sorted(set(ra) | set(rb)):
                if k in BYTE_KEYS or k.endswith("_per_node") or ra.get(k) == rb.get(k):
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


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump(Path(sys.argv[2]).resolve(), Path(sys.argv[3]))
    else:
        raise SystemExit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
