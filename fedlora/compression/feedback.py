"""Error feedback (EF, "memory"): carry what compression dropped into the next round.

    ef = ErrorFeedback()                       # or ErrorFeedback.from_state_dict(saved)
    compensated = ef.compensate(update)        # update + stored residual
    payload = pipe.encode(compensated)
    ef.update(compensated, pipe.decode(payload))   # residual := compensated - decoded
    saved = ef.state_dict()                    # {name: float32 array}, persist between rounds

Works with any pipeline (the residual is measured on the decoded result, whatever the codec did).
Over rounds the sum of what was sent tracks the sum of the true updates up to the current residual,
which stays bounded for contractive codecs (top-k, quantization), instead of drifting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .arrays import to_float32

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Per-tensor residual memory for error-feedback compression."""

    def __init__(self) -> None:
        self.residual: dict[str, np.ndarray] = {}

    def compensate(self, tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``tensors + residual`` (float32, same order). A stored residual whose shape no longer
        matches its tensor is discarded (the model changed)."""
        out: dict[str, np.ndarray] = {}
        for name, t in tensors.items():
            x = to_float32(name, t)
            res = self.residual.get(name)
            if res is not None and res.shape == x.shape:
                out[name] = x + res
            else:
                out[name] = x.copy()
        return out

    def update(self, compensated: Mapping[str, Any], decoded: Mapping[str, Any]) -> None:
        """Store ``compensated - decoded`` per tensor (a tensor missing from ``decoded`` counts as
        not sent at all). Residuals of tensors absent from ``compensated`` are dropped."""
        new: dict[str, np.ndarray] = {}
        for name, t in compensated.items():
            x = to_float32(name, t)
            if name in decoded:
                d = to_float32(name, decoded[name])
                if d.shape != x.shape:
                    raise ValueError(f"decoded {name!r} has shape {d.shape}, compensated "
                                     f"{x.shape}")
                new[name] = x - d
            else:
                new[name] = x.copy()
        self.residual = new

    def reset(self) -> None:
        self.residual = {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain ``{name: float32 array}`` copy of the residuals."""
        return {k: v.copy() for k, v in self.residual.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ErrorFeedback":
        ef = cls()
        ef.residual = {str(k): np.array(v, dtype=np.float32, copy=True) for k, v in state.items()}
        return ef

    def __len__(self) -> int:
        return len(self.residual)
