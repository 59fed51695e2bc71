"""Per-round records → ``rounds.jsonl`` + ``rounds.csv`` + TensorBoard events (``tb/``), a compact
log line, a final summary."""

from __future__ import annotations

import csv
import json
import logging
import math
import numbers
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("flwr.fedlora")

CSV_FIELDS = [
    "round", "accuracy", "loss", "clients", "failures", "dropped", "bytes_down", "bytes_up",
    "payload_down", "payload_up", "params_up", "analytic_bytes_up", "control_bytes", "cum_mb_down",
    "cum_mb_up", "cum_mb_control", "cum_mb", "round_s", "wall_s",
]


class Recorder:
    """Writes one record per round; records are plain dicts (see :data:`CSV_FIELDS`)."""

    def __init__(self, run_dir: Path, meta: dict[str, Any], *, tensorboard: bool = True,
                 resume_records: list[dict[str, Any]] | None = None) -> None:
        """``resume_records``: continue a run whose records so far are these (from its
        checkpoint): rounds.jsonl / rounds.csv / tb/ are rewritten to hold exactly them (each
        round once, whatever the crashed run wrote after its checkpoint), the cumulative
        counters continue from them and ``wall_s`` from their last value."""
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
        self._tb = TensorBoardLog(self.dir / "tb", meta) if tensorboard else None
        if resume_records:
            self._resume(resume_records)

    def _resume(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            self.cum_down += int(rec.get("bytes_down", 0))
            self.cum_up += int(rec.get("bytes_up", 0))
            self.cum_control += int(rec.get("control_bytes", 0))
            self.records.append(dict(rec))
        self.t0 = time.time() - float(records[-1].get("wall_s", 0.0) or 0.0)
        jsonl = "".join(json.dumps(r, default=str) + "\n" for r in self.records)
        tmp = self._jsonl.with_name(self._jsonl.name + ".tmp")
        tmp.write_text(jsonl)
        tmp.replace(self._jsonl)
        with self._csv.open("a", newline="") as f:
            w = csv.writer(f)
            for r in self.records:
                w.writerow([_fmt(r.get(k, "")) for k in CSV_FIELDS])
        if self._tb is not None:
            for r in self.records:
                self._tb.write(r)

    def log_round(self, rec: dict[str, Any], *,
                  checkpoint: "Callable[[list[dict[str, Any]]], Any] | None" = None
                  ) -> dict[str, Any]:
        """Complete ``rec`` (cumulative MB, ``wall_s``) and write it. ``checkpoint``: called
        with the records so far (this one last) before anything is written, to save the round's
        checkpoint (it sets ``checkpoint_bytes`` in this record); an error there is logged and
        the run goes on."""
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
        if checkpoint is not None:
            try:
                checkpoint(self.records)
            except Exception as err:  # a full disk must not end a long run
                rec["checkpoint_error"] = f"{type(err).__name__}: {err}"[:300]
                log.exception("[fedlora] round %s: checkpoint not written", rec.get("round"))
        with self._jsonl.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        with self._csv.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(rec.get(k, "")) for k in CSV_FIELDS])
        if self._tb is not None:
            self._tb.write(rec)
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
        if self._tb is not None:
            self._tb.close()
        log.info("[fedlora] summary: %s", json.dumps(summary, default=str))
        return summary


class TensorBoardLog:
    """Scalars of each round record → TensorBoard event files in ``log_dir`` (``<run>/tb/``).

    Step = the round, except ``accuracy_vs_kb/accuracy`` whose step is the cumulative KB
    (down + up + control, 1 KB = 1000 bytes) so TensorBoard plots accuracy against traffic.
    Every top-level numeric key of a record also goes under ``round/<key>``, so keys added to
    records later show up without touching this class. Values are stored as float32 (TensorBoard's
    scalar type). Never raises: without the ``tensorboard`` package, or on a write error, it logs
    one warning and stops writing; the JSONL/CSV records are unaffected.
    """

    def __init__(self, log_dir: Path, meta: dict[str, Any] | None = None) -> None:
        self.dir = Path(log_dir)
        self._w: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except Exception as e:  # ImportError, or a broken install
            log.warning("[fedlora] TensorBoard logging off (%s: %s)", type(e).__name__, e)
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Like rounds.jsonl, a run dir reused under the same name starts over.
            for old in self.dir.glob("events.out.tfevents.*"):
                old.unlink()
            self._w = SummaryWriter(log_dir=str(self.dir))
            if meta is not None:
                self._w.add_text("run/meta", "```\n" + json.dumps(meta, indent=2, default=str)
                                 + "\n```", 0)
                self._w.flush()
        except Exception as e:
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        log.warning("[fedlora] TensorBoard logging stopped (%s: %s)", type(e).__name__, e)
        w, self._w = self._w, None
        if w is not None:
            try:
                w.close()
            except Exception:
                pass

    @staticmethod
    def scalars(rec: dict[str, Any]) -> list[tuple[str, float, int]]:
        """``(tag, value, step)`` for one record (after :class:`Recorder` added the cum_* keys)."""
        step = int(rec.get("round", 0))
        out: list[tuple[str, float, int]] = []

        def add(tag: str, key: str) -> None:
            v = _number(rec.get(key))
            if v is not None:
                out.append((tag, v, step))

        add("eval/accuracy", "accuracy")
        add("eval/loss", "loss")
        add("bytes/down", "bytes_down")
        add("bytes/up", "bytes_up")
        add("bytes/control", "control_bytes")
        add("cum_mb/total", "cum_mb")
        add("cum_mb/down", "cum_mb_down")
        add("cum_mb/up", "cum_mb_up")
        add("cum_mb/control", "cum_mb_control")
        add("nodes/clients", "clients")
        add("nodes/failures", "failures")
        add("nodes/dropped", "dropped")
        tiers = rec.get("tiers")
        if isinstance(tiers, dict):
            for direction in ("down", "up"):
                per_node = rec.get(f"bytes_{direction}_per_node")
                if not isinstance(per_node, dict):
                    continue
                sums: dict[str, float] = {}
                for node, b in per_node.items():
                    v = _number(b)
                    if v is not None:
                        tier = str(tiers.get(node, tiers.get(str(node), "unknown")))
                        sums[tier] = sums.get(tier, 0.0) + v
                for tier, v in sorted(sums.items()):
                    out.append((f"tier_bytes/{direction}/tier_{tier}", v, step))
        acc, cum_mb = _number(rec.get("accuracy")), _number(rec.get("cum_mb"))
        if acc is not None and cum_mb is not None and math.isfinite(cum_mb):
            # via whole bytes: int(1.234 * 1000) would give 1233
            out.append(("accuracy_vs_kb/accuracy", acc, int(round(cum_mb * 1e6)) // 1000))
        for key, raw in rec.items():
            v = _number(raw)
            if v is not None and key != "round":
                out.append((f"round/{key}", v, step))
        return out

    def write(self, rec: dict[str, Any]) -> None:
        if self._w is None:
            return
        try:
            for tag, v, step in self.scalars(rec):
                self._w.add_scalar(tag, v, step)
            self._w.flush()
        except Exception as e:
            self._fail(e)

    def close(self) -> None:
        if self._w is not None:
            try:
                self._w.close()
            except Exception as e:
                log.warning("[fedlora] TensorBoard close failed (%s: %s)", type(e).__name__, e)
            self._w = None


def _number(v: Any) -> float | None:
    """``v`` as a float when it is a real number (bools count as 0/1), else None."""
    if not isinstance(v, numbers.Real):
        return None
    try:
        return float(v)
    except (OverflowError, ValueError, TypeError):
        return None


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
