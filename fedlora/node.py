"""What a node caps for itself, from its own node config (``flower-supernode --node-config``).

Keys (all optional; 0 or absent = no cap; docs/edge.md):

* ``threads``: torch intra-op threads of this node's ClientApp; the smaller of it and run-config
  ``client-threads`` is used.
* ``interop-threads``: torch inter-op threads; torch accepts it once per process, before any
  parallel work, so it applies from the node's first message on (later changes are ignored).
* ``max-local-steps``: at most this many optimizer steps per round (over all local epochs).
* ``max-data-mb``: the node's training tensors (float images / token ids + mask) are at most this
  many MiB: the node trains on a fixed random subset of its examples (seed, partition) that fits.

The caps stay on the node: nothing of them is sent. The server sees what a reply carries anyway
(the update, ``num-examples``, ``train-steps``, ``train-loss``: fewer steps or examples show
there as they would for a smaller node).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Mapping

KEYS = ("threads", "interop-threads", "max-local-steps", "max-data-mb")


@dataclass(frozen=True)
class NodeLimits:
    threads: int = 0
    interop_threads: int = 0
    max_local_steps: int = 0
    max_data_mb: float = 0.0

    @classmethod
    def from_node_config(cls, nc: Mapping[str, Any]) -> "NodeLimits":
        """Parsed and checked: a negative or non-numeric value raises ValueError naming it."""
        vals = {}
        for key in KEYS:
            raw = nc.get(key, 0)
            try:
                v = float(raw) if key == "max-data-mb" else int(raw)
                if isinstance(raw, bool) or (key != "max-data-mb" and float(raw) != v):
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(f"node config {key!r} must be a non-negative "
                                 f"{'number' if key == 'max-data-mb' else 'integer'}, got "
                                 f"{raw!r}") from None
            if v < 0 or v != v:
                raise ValueError(f"node config {key!r} must be >= 0 (0 = no cap), got {raw!r}")
            vals[key.replace("-", "_")] = v
        return cls(**vals)


_CURRENT: contextvars.ContextVar[NodeLimits] = contextvars.ContextVar(
    "fedlora_node_limits", default=NodeLimits())
_INTEROP_SET = False


def current() -> NodeLimits:
    """The limits of the node whose ClientApp call is running (none outside one)."""
    return _CURRENT.get()


@contextlib.contextmanager
def limits(lim: NodeLimits):
    """Apply ``lim`` for the duration of one ClientApp call."""
    token = _CURRENT.set(lim)
    try:
        yield lim
    finally:
        _CURRENT.reset(token)


def set_threads(client_threads: int, lim: NodeLimits) -> int:
    """torch threads for this call: ``client-threads`` capped by the node's ``threads``; the
    node's ``interop-threads`` once per process. Returns the intra-op thread count."""
    global _INTEROP_SET
    import torch

    n = max(1, int(client_threads))
    if lim.threads:
        n = min(n, lim.threads)
    torch.set_num_threads(n)
    if lim.interop_threads and not _INTEROP_SET:
        try:
            torch.set_num_interop_threads(lim.interop_threads)
        except RuntimeError:  # parallel work already ran in this process: torch refuses
            pass
        _INTEROP_SET = True
    return n


def cap_by_memory(idx, bytes_per_example: int, partition_id: int, seed: int):
    """``idx`` cut to the examples whose training tensors fit in ``max-data-mb`` (a fixed
    random subset, seeded by (seed, partition), in the original order)."""
    import numpy as np

    mb = current().max_data_mb
    if not mb or bytes_per_example <= 0:
        return idx
    keep = int(mb * 2**20 // bytes_per_example)
    if len(idx) <= keep:
        return idx
    rng = np.random.default_rng([int(seed), int(partition_id), 38])
    return np.sort(rng.choice(np.asarray(idx), keep, replace=False))
