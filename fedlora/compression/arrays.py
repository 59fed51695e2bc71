"""Array helpers shared by the codecs: the optional torch import, tensor input conversion to
float32 (:func:`to_float32`, which also accepts torch tensors), a zero-copy bytes view
(:func:`as_bytes`) and the finiteness check (:func:`check_finite`)."""

from __future__ import annotations

import math

import numpy as np

from .errors import CodecError

try:  # torch is optional: used for its fused multi-threaded kernels and to accept torch tensors
    import torch as _torch
except ImportError:  # pragma: no cover - exercised only without torch
    _torch = None

__all__ = ["FLT_MAX", "to_float32", "as_bytes", "check_finite"]

FLT_MAX = float(np.finfo(np.float32).max)


def to_float32(name, t) -> np.ndarray:
    """``t`` (numpy or torch, any float dtype) as a contiguous native float32 array; CodecError
    for a non-str name or a non-float dtype."""
    if not isinstance(name, str):
        raise CodecError(f"tensor names must be str, got {type(name).__name__}")
    if _torch is not None and isinstance(t, _torch.Tensor):
        if not t.is_floating_point():
            raise CodecError(f"tensor {name!r}: dtype {t.dtype} is not a float dtype")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        arr = t.to(_torch.float32).contiguous().numpy()
    else:
        arr = np.asarray(t)
        if arr.dtype.kind != "f":
            raise CodecError(f"tensor {name!r}: dtype {arr.dtype} is not a float dtype")
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(arr.shape)  # (0-d stays 0-d)
    if not arr.dtype.isnative:  # pragma: no cover - big-endian inputs
        arr = arr.astype("<f4")
    return arr


def as_bytes(a: np.ndarray):
    """Zero-copy bytes-like view of a contiguous array (``b""`` when empty)."""
    if a.size == 0:
        return b""
    return memoryview(np.ascontiguousarray(a).reshape(-1)).cast("B")


def check_finite(x: np.ndarray, what: str = "input") -> None:
    """CodecError ``"<what> contains NaN or Inf"`` unless every value of float ``x`` is finite
    (two SIMD reductions, no temporary)."""
    if x.size and not (math.isfinite(float(x.min())) and math.isfinite(float(x.max()))):
        raise CodecError(f"{what} contains NaN or Inf")
