"""Per-round records → ``rounds.jsonl`` + ``rounds.csv``, a compact log line, a final summary."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("flwr.fedlora")

CSV_FIELDS = [
    "round", "accuracy", "loss", "clients", "failures", "dropped", "bytes_down", "bytes_up",
    "payload_down", "payload_up", "params_up", "analytic_bytes_up", "control_bytes", "cum_mb_down",
    "cum_mb_up", "cum_mb_control", "cum_mb", "round_s", "wall_s",
]


class Recorder:
    """Writes one record per round; records are plain dicts (see :data:`CSV_FIELDS`)."""

    def __init__(self, run_dir: Path, meta: dict[str, Any]) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.cum_down = 0
        self.cum_up = 0
        self.cum_control = 0  # query messages (tiers, partition-ids) and their replies
        self.records: list[dict[str, Any]] = []
        (self.dir / "run.json").write_text(json.dumps(meta, indent=2, default=str))
        self._jsonl = self.dir / "rounds.jsonl"
        self._csv = self.dir / "rounds.csv"
        self._jsonl.write_text("")
        with self._csv.open("w", newline="") as f:
            csv.writer(f).writerow(CSV_FIELDS)

    def log_round(self, rec: dict[str, Any]) -> dict[str, Any]:
        self.cum_down += int(rec.get("bytes_down", 0))
        self.cum_up += int(rec.get("bytes_up", 0))
        self.cum_control += int(rec.get("control_bytes", 0))
        rec = dict(rec)
        rec["cum_mb_down"] = self.cum_down / 1e6
        rec["cum_mb_up"] = self.cum_up / 1e6
        rec["cum_mb_control"] = self.cum_control / 1e6
        rec["cum_mb"] = (self.cum_down + self.cum_up + self.cum_control) / 1e6
        rec["wall_s"] = round(time.time() - self.t0, 3)
        self.records.append(rec)
        with self._jsonl.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        with self._csv.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(rec.get(k, "")) for k in CSV_FIELDS])
        log.info(
            "[fedlora] round %3d | acc %.4f | loss %.4f | clients %d (failed %d, dropped %d) | "
            "down %.3f MB up %.3f MB | cum %.3f MB | %.1fs",
            rec["round"], rec.get("accuracy", float("nan")), rec.get("loss", float("nan")),
            rec.get("clients", 0), rec.get("failures", 0), rec.get("dropped", 0),
            rec.get("bytes_down", 0) / 1e6, rec.get("bytes_up", 0) / 1e6, rec["cum_mb"],
            rec["wall_s"])
        return rec

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        accs = [r["accuracy"] for r in self.records if "accuracy" in r]
        summary = {
            "rounds": max((r["round"] for r in self.records), default=0),
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "total_mb_down": self.cum_down / 1e6,
            "total_mb_up": self.cum_up / 1e6,
            "total_mb_control": self.cum_control / 1e6,
            "wall_s": round(time.time() - self.t0, 3),
            **extra,
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        log.info("[fedlora] summary: %s", json.dumps(summary, default=str))
        return summary


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
