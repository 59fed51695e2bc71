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
        self.meta = meta
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
        log.info("%s", self.console_line(rec))
        return rec

    def console_line(self, rec: dict[str, Any]) -> str:
        """The round's console row: accuracy and loss only when the round was evaluated, and
        an ETA (mean time per round so far × rounds left) while rounds are left."""
        head = f"[fedlora] round {rec['round']:3d} | "
        if _number(rec.get("accuracy")) is not None:
            head += f"acc {rec['accuracy']:.4f} | "
        if _number(rec.get("loss")) is not None:
            head += f"loss {rec['loss']:.4f} | "
        line = (f"{head}clients {rec.get('clients', 0)} (failed {rec.get('failures', 0)}, "
                f"dropped {rec.get('dropped', 0)}) | down {rec.get('bytes_down', 0) / 1e6:.3f} MB "
                f"up {rec.get('bytes_up', 0) / 1e6:.3f} MB | cum {rec['cum_mb']:.3f} MB | "
                f"{rec['wall_s']:.1f}s")
        eta = self.eta_s()
        return line if eta is None else f"{line} | eta {format_duration(eta)}"

    def eta_s(self) -> float | None:
        """Seconds the rounds left will take at the mean pace of the rounds recorded so far
        (``wall_s`` from the first record to the last, over the rounds between them); None
        before two records, when the run's round count is unknown, or after the last round."""
        total = (self.meta.get("config") or {}).get("num-server-rounds")
        if len(self.records) < 2 or not isinstance(total, int):
            return None
        first, last = self.records[0], self.records[-1]
        done = int(last["round"]) - int(first["round"])
        left = total - int(last["round"])
        if done <= 0 or left <= 0:
            return None
        return (float(last["wall_s"]) - float(first.get("wall_s", 0.0) or 0.0)) / done * left

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        accs = [r["accuracy"] for r in self.records if "accuracy" in r]
        summary = {
            "rounds": max((r["round"] for r in self.records), default=0),
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            **_final_perplexity(self.records),
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
    Every other top-level numeric key of a record goes under ``round/<key>`` (each number under
    one tag), so keys added to records later show up without touching this class. The run
    config is written once as TensorBoard hparams (the HParams dashboard). Values are stored as
    float32 (TensorBoard's scalar type). Never raises: without the ``tensorboard`` package, or
    on a write error, it logs one warning and stops writing; the JSONL/CSV records are unaffected.
    """

    #: record key → its named tag (not repeated under ``round/``)
    NAMED = {"accuracy": "eval/accuracy", "loss": "eval/loss", "bytes_down": "bytes/down",
             "bytes_up": "bytes/up", "control_bytes": "bytes/control", "cum_mb": "cum_mb/total",
             "cum_mb_down": "cum_mb/down", "cum_mb_up": "cum_mb/up",
             "cum_mb_control": "cum_mb/control", "clients": "nodes/clients",
             "failures": "nodes/failures", "dropped": "nodes/dropped"}

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
                self._hparams(meta.get("config") or {})
                self._w.flush()
        except Exception as e:
            self._fail(e)

    def _hparams(self, config: dict[str, Any]) -> None:
        """The run config as TensorBoard hparams (torch's hparams summary, written into this
        run's event file, not a sub-run as ``add_hparams`` would): numbers and bools as numbers,
        everything else as its string, with ``eval/accuracy`` and ``eval/loss`` as the metrics."""
        if not config:
            return
        from torch.utils.tensorboard.summary import hparams

        values = {k: hparam_value(v) for k, v in sorted(config.items())}
        for summary in hparams(values, {"eval/accuracy": 0.0, "eval/loss": 0.0}):
            self._w.file_writer.add_summary(summary)

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

        for key, tag in TensorBoardLog.NAMED.items():
            add(tag, key)
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
            if v is not None and key != "round" and key not in TensorBoardLog.NAMED:
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


def hparam_value(v: Any) -> "int | float | str":
    """A run-config value as an hparam: bools and finite real numbers as numbers, the rest
    (strings, None, lists, NaN) as their string."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, numbers.Real) and math.isfinite(float(v)):
        return v if isinstance(v, (int, float)) else float(v)
    return "" if v is None else str(v)


def _final_perplexity(records: list[dict[str, Any]]) -> dict[str, float]:
    """causal-lm runs: the last evaluation's held-out perplexity and loss ({} otherwise)."""
    ppl = [r for r in records if "perplexity" in r]
    return ({"final_perplexity": ppl[-1]["perplexity"], "final_loss": ppl[-1].get("loss")}
            if ppl else {})


def _number(v: Any) -> float | None:
    """``v`` as a float when it is a real number (bools count as 0/1), else None."""
    if not isinstance(v, numbers.Real):
        return None
    try:
        return float(v)
    except (OverflowError, ValueError, TypeError):
        return None


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``: a duration as the console shows an ETA."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
