"""The main job's closing line: its measured bytes against the two references measured on the
same rounds, clients and seed (``results/main-job``: dense LoRA in fp32 and full fine-tuning,
``python benchmarks/run.py main-job``).

    python scripts/compare_main_job.py runs/<run-name>

Prints one line; exit status 0, or 1 when the run folder holds no finished run. A run whose
config differs from the preset (an override given to ``./run``) has no measured reference:
the line says so rather than compare unlike runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# keys that say where a run wrote, not what it computed
WHERE = {"run-dir", "run-name", "resume"}


def _summary(run: Path) -> dict | None:
    try:
        return json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _config(run: Path) -> dict:
    try:
        cfg = json.loads((run / "run.json").read_text()).get("config", {})
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in cfg.items() if k not in WHERE}


def compare(run: Path, refs: Path = ROOT / "results" / "main-job") -> tuple[int, str]:
    from benchmarks.suites import SUITES

    ours = _summary(run)
    if ours is None:
        return 1, f"no finished run in {run} (summary.json missing)"
    want = SUITES["main-job"]()["runs"]["lora-compressed"]
    mine = _config(run)
    if any(mine.get(k) != v for k, v in want.items()):
        return 0, ("[fedlora] no measured reference for this configuration (it differs from "
                   "./run's preset); results/main-job holds the references of the preset")
    parts = []
    for name, label in (("lora-dense-fp32", "dense fp32 LoRA"),
                        ("full-ft-fp32", "full fine-tuning (FedAvg, fp32)")):
        ref_dir = refs / "runs" / name
        ref = _summary(ref_dir)
        if ref is None:
            parts.append(f"{label}: no committed run in {ref_dir}")
            continue
        ref_cfg = _config(ref_dir)
        acc = ref.get("final_accuracy")
        parts.append(f"{label} {ref['total_mb']:.2f} MB, acc {acc:.4f} "
                     f"({ref['total_mb'] / ours['total_mb']:.1f}x more; "
                     f"{ref_dir.relative_to(ROOT)}, seed {ref_cfg.get('seed')})")
    acc = ours.get("final_accuracy")
    acc_s = f"{acc:.4f}" if isinstance(acc, (int, float)) else "n/a"
    return 0, (f"[fedlora] this run: {ours['total_mb']:.2f} MB both ways, final accuracy {acc_s}"
               f" | measured on the same rounds and clients: " + " | ".join(parts))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python scripts/compare_main_job.py RUN_DIR", file=sys.stderr)
        return 2
    rc, line = compare(Path(argv[0]))
    print(line, file=sys.stderr if rc else sys.stdout)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
