"""Per-round server checkpoints, and resuming a run from its last complete round.

After every round ``r`` ≥ 1 the ServerApp writes ``<run>/checkpoints/round-<r>.ckpt``: the global
trainable tensors, the strategy's ``state_dict()`` (with ``strategy.privacy``'s when attached),
the Python / NumPy / torch global RNG states and the round records so far; atomically (temp
file, fsync, rename, fsync of the folder), keeping the newest ``keep-checkpoints``. One SHA-256
over the file detects a torn or bit-rotten one; the state is read with
``torch.load(weights_only=True)`` (no pickled code runs). Resume (run-config ``resume``):
:func:`find_resume` picks the newest checkpoint whose checksum holds, :func:`check_compatible`
refuses a config that differs (except :data:`MAY_CHANGE`; ``num-server-rounds`` may grow), and
the strategy's one run loop (``FedLoraStrategy.start``, ``first_round``) continues with the real
round numbers. What is saved, the file layout and what survives a restart: docs/resume.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger("flwr.fedlora")

MAGIC = b"FEDLORA-CHECKPOINT 1\n"
FORMAT = 1
DIRNAME = "checkpoints"
_NAME = re.compile(r"^round-(\d{6,})\.ckpt$")

#: run-config keys a resumed run may set differently (where things run, not what is computed)
MAY_CHANGE = frozenset({"round-timeout", "client-threads", "device", "data-dir", "run-dir",
                        "run-name", "resume", "keep-checkpoints"})
#: keys that may only grow
MAY_GROW = frozenset({"num-server-rounds"})


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, torn, corrupt or of another format."""


class ResumeRefused(ValueError):
    """The run to resume was checkpointed with another config, base model or tensors."""


# ------------------------------------------------------------------------------ (de)serializing


def _pack(obj: Any) -> Any:
    """numpy arrays → ``{"__ndarray__": raw bytes as a uint8 tensor, dtype, shape}`` (bit exact,
    any dtype), numpy scalars → Python scalars, tensors → detached CPU tensors, sets → sorted
    lists; containers recursively. Everything else must be a plain value."""
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        raw = torch.frombuffer(bytearray(a.tobytes()), dtype=torch.uint8) if a.nbytes else \
            torch.zeros(0, dtype=torch.uint8)
        return {"__ndarray__": raw, "dtype": a.dtype.str, "shape": list(a.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if torch.is_tensor(obj):
        return obj.detach().cpu().clone()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _pack(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v) for v in obj)
    return obj


def _unpack(obj: Any) -> Any:
    if isinstance(obj, dict) and "__ndarray__" in obj:
        raw = obj["__ndarray__"].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _unpack(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v) for v in obj)
    return obj


def state_bytes(state: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(_pack(dict(state)), buf)
    return buf.getvalue()


def rng_state() -> dict[str, Any]:
    """The process-global generators (Flower's ``sample_nodes`` uses ``random``)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def set_rng_state(s: Mapping[str, Any]) -> None:
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(s["torch"])


# ------------------------------------------------------------------------------ files


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / DIRNAME


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return checkpoint_dir(run_dir) / f"round-{int(server_round):06d}.ckpt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, path) of every checkpoint file, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(out)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of
    ``data``, also across a power loss: temp file in the same folder, fsync, rename, fsync of
    the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _assemble(header: dict, state: bytes, records_json: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True, default=str).encode()
    rest = head + b"\n" + state + records_json
    return MAGIC + hashlib.sha256(rest).hexdigest().encode() + b"\n" + rest


def encode_checkpoint(header: dict, state: bytes, records: list[dict]) -> bytes:
    """The file's bytes. The last record gets ``checkpoint_bytes`` = the file's own size (a
    fixed point: only the digit count of that number can change the size)."""
    header = dict(header, format=FORMAT, state_bytes=len(state))
    size = len(state) + 1000
    for _ in range(20):
        if records:
            records[-1]["checkpoint_bytes"] = size
        rec = json.dumps(records, default=str).encode()
        data = _assemble(dict(header, records_bytes=len(rec)), state, rec)
        if len(data) == size:
            return data
        size = len(data)
    raise CheckpointError("checkpoint size did not settle")  # pragma: no cover


@dataclass
class Loaded:
    """A checkpoint whose checksum holds."""

    path: Path
    header: dict[str, Any]
    records: list[dict[str, Any]]
    _state: bytes = field(repr=False)

    @property
    def round(self) -> int:
        return int(self.header["round"])

    def state(self) -> dict[str, Any]:
        try:
            return _unpack(torch.load(io.BytesIO(self._state), weights_only=True))
        except Exception as err:  # checksum held: a format problem, not a torn file
            raise CheckpointError(f"{self.path}: server state does not load: "
                                  f"{type(err).__name__}: {err}") from err


def read_checkpoint(path: Path) -> Loaded:
    """Read and verify one checkpoint; CheckpointError says what is wrong with it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: {err}") from err
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a fedlora checkpoint (format {FORMAT})")
    body = data[len(MAGIC):]
    digest, _, rest = body.partition(b"\n")
    if len(digest) != 64 or hashlib.sha256(rest).hexdigest().encode() != digest:
        raise CheckpointError(f"{path}: checksum mismatch ({len(data)} bytes): torn or corrupt")
    head, _, payload = rest.partition(b"\n")
    try:
        header = json.loads(head)
        n_state, n_rec = int(header["state_bytes"]), int(header["records_bytes"])
        if header.get("format") != FORMAT or n_state + n_rec != len(payload):
            raise ValueError("section lengths or format do not match")
        records = json.loads(payload[n_state:])
        int(header["round"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: bad header: {err}") from err
    return Loaded(path, header, records, payload[:n_state])


def latest(run_dir: Path) -> Loaded | None:
    """The newest checkpoint of ``run_dir`` that verifies; corrupt or partial newer ones are
    logged and skipped (the previous one is used). None when there is none."""
    for rnd, path in reversed(list_checkpoints(run_dir)):
        try:
            found = read_checkpoint(path)
        except CheckpointError as err:
            log.warning("[fedlora] skipping checkpoint of round %d: %s", rnd, err)
            continue
        if found.round != rnd:
            log.warning("[fedlora] skipping %s: it holds round %d", path, found.round)
            continue
        return found
    return None


class Checkpointer:
    """Writes a run's per-round checkpoints and keeps the newest ``keep`` (0: writes none)."""

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        if int(keep) < 0:
            raise ValueError(f"run-config 'keep-checkpoints' must be >= 0, got {keep}")
        self.run_dir = Path(run_dir)
        self.keep = int(keep)

    @property
    def enabled(self) -> bool:
        return self.keep > 0

    def clear(self) -> None:
        """A fresh run in a reused run folder starts over: old checkpoints go."""
        for _, path in list_checkpoints(self.run_dir):
            path.unlink(missing_ok=True)

    def set_aside_after(self, server_round: int) -> None:
        """Rename checkpoints newer than ``server_round`` (the ones that did not verify) to
        ``*.corrupt``, so they neither shadow nor count against the kept ones."""
        for rnd, path in list_checkpoints(self.run_dir):
            if rnd > server_round:
                path.replace(path.with_name(path.name + ".corrupt"))

    def save(self, server_round: int, header: dict, state: Mapping[str, Any],
             records: list[dict]) -> int:
        """Write round ``server_round``'s checkpoint (sets ``checkpoint_bytes`` in
        ``records[-1]``), drop the older ones beyond ``keep``; returns its size in bytes."""
        data = encode_checkpoint(dict(header, round=int(server_round)), state_bytes(state),
                                 records)
        write_atomic(checkpoint_path(self.run_dir, server_round), data)
        for _, old in list_checkpoints(self.run_dir)[:-self.keep]:
            old.unlink(missing_ok=True)
        return len(data)


# ------------------------------------------------------------------------------ server state


def server_state(strategy: Any, global_state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Everything the server needs to run the next round, as plain containers."""
    out = {"global": OrderedDict(global_state), "strategy": strategy.state_dict(),
           "rng": rng_state()}
    privacy = getattr(strategy, "privacy", None)
    if privacy is not None and hasattr(privacy, "state_dict"):
        out["privacy"] = privacy.state_dict()
    loop = getattr(strategy, "async_state", None)  # aggregation-mode=async: the loop's own state
    if loop is not None:
        out["async"] = loop()
    return out


def restore(strategy: Any, state: Mapping[str, Any]) -> "OrderedDict[str, np.ndarray]":
    """Load ``state`` (from :func:`server_state`) into a freshly built strategy and the global
    RNGs; returns the global trainable tensors."""
    strategy.load_state_dict(state["strategy"])
    privacy = getattr(strategy, "privacy", None)
    if "privacy" in state:
        if privacy is None or not hasattr(privacy, "load_state_dict"):
            raise ResumeRefused("the checkpoint holds privacy-accountant state, this run has no "
                                "accountant to load it into")
        privacy.load_state_dict(state["privacy"])
    set_rng_state(state["rng"])
    if "async" in state:  # read by the async loop when it starts (strategies/buffered.py)
        strategy.async_restored = state["async"]
    return OrderedDict((k, np.asarray(v, dtype=np.float32)) for k, v in state["global"].items())


def header_for(cfg: Any, fingerprint: str, shapes: Mapping[str, tuple[int, ...]]) -> dict:
    return {"method": cfg.method, "config": cfg.as_dict(), "base_fingerprint": fingerprint,
            "shapes": {k: list(v) for k, v in shapes.items()}}


# ------------------------------------------------------------------------------ resume


def check_compatible(header: Mapping[str, Any], cfg: Any, fingerprint: str | None = None,
                     shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise ResumeRefused naming every key in which this run differs from the checkpointed
    one (keys in :data:`MAY_CHANGE` may differ; ``num-server-rounds`` may grow), or a different
    base model fingerprint / trainable tensors. ``fingerprint``/``shapes`` None: not checked."""
    from .config import RunConfig

    defaults = RunConfig.keys()
    old, new = dict(header.get("config", {})), cfg.as_dict()
    problems = []
    for key in sorted(set(old) | set(new)):
        if key in MAY_CHANGE:
            continue
        a, b = old.get(key, defaults.get(key)), new.get(key, defaults.get(key))
        if key in MAY_GROW:
            if b is None or a is None or b < a:
                problems.append(f"'{key}' {b!r} is below the checkpointed run's {a!r} (it may "
                                "only grow)")
            continue
        if a != b:
            problems.append(f"'{key}': checkpointed run {a!r}, this run {b!r}")
    if fingerprint is not None and header.get("base_fingerprint") != fingerprint:
        problems.append(f"base model fingerprint: checkpointed run "
                        f"{str(header.get('base_fingerprint'))[:16]}…, this run {fingerprint[:16]}…")
    if shapes is not None:
        want = {k: list(v) for k, v in shapes.items()}
        if header.get("shapes") != want:
            problems.append("trainable tensors (names or shapes) differ")
    if problems:
        raise ResumeRefused(
            f"refusing to resume from round {header.get('round')}: this run differs from the "
            f"checkpointed one: " + "; ".join(problems) + f". Keys that may change on resume: "
            f"{', '.join(sorted(MAY_CHANGE | MAY_GROW))}")


def find_resume(cfg: Any, default_run_dir: Path) -> tuple[Path, Loaded | None]:
    """(run folder, checkpoint to resume from or None) for the run-config ``resume``:

    * ``""``: (``default_run_dir``, None), a fresh run;
    * ``"auto"``: ``default_run_dir`` (the folder of this ``run-name``) and its newest valid
      checkpoint, or None (fresh run) when it has none;
    * a path: that run folder, which must hold a valid checkpoint (CheckpointError otherwise).
    """
    value = str(cfg.resume or "").strip()
    if not value:
        return Path(default_run_dir), None
    if value == "auto":
        if not cfg.run_name:
            log.warning("[fedlora] resume='auto' needs a fixed run-name; starting a fresh run")
            return Path(default_run_dir), None
        found = latest(default_run_dir)
        if found is None:
            log.info("[fedlora] resume='auto': no checkpoint in %s; starting a fresh run",
                     default_run_dir)
        return Path(default_run_dir), found
    run_dir = Path(value).expanduser().resolve()
    found = latest(run_dir)
    if found is None:
        have = [p.name for _, p in list_checkpoints(run_dir)]
        raise CheckpointError(f"resume={value!r}: no valid checkpoint in "
                              f"{checkpoint_dir(run_dir)} (files: {have or 'none'})")
    return run_dir, found


def resumable(run_dir: Path, run_config: Mapping[str, Any]) -> tuple[bool, str]:
    """Can a run with these run-config overrides resume from ``run_dir``? (answer, why not) —
    for launchers deciding between resuming and starting over (the ServerApp checks again,
    with the base model's fingerprint)."""
    from .config import RunConfig

    found = latest(run_dir)
    if found is None:
        return False, "no valid checkpoint"
    try:
        check_compatible(found.header, RunConfig.from_run_config(run_config))
    except (ResumeRefused, ValueError) as err:
        return False, str(err)
    return True, f"round {found.round}"


def resume_run_config(run_dir: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Run-config overrides that resume ``run_dir`` (``python -m fedlora.launch ... --resume``):
    the checkpointed run's settings that differ from the defaults, then ``overrides``, then
    ``resume``/``run-dir``/``run-name`` pointing at ``run_dir``. CheckpointError when it holds
    no valid checkpoint."""
    from .config import RunConfig

    run_dir = Path(run_dir).expanduser().resolve()
    found = latest(run_dir)
    if found is None:
        raise CheckpointError(f"--resume {run_dir}: no valid checkpoint in "
                              f"{checkpoint_dir(run_dir)}")
    defaults = RunConfig.keys()
    saved = {k: v for k, v in found.header.get("config", {}).items()
             if k in defaults and v != defaults[k] and k not in ("resume", "run-dir", "run-name")}
    return {**saved, **overrides, "resume": str(run_dir), "run-dir": str(run_dir.parent),
            "run-name": run_dir.name}
