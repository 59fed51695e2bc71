"""``ranks`` — send only the non-zero LoRA rank slices (LoRA-A2 zeroes unselected ranks).

The rank axis is dim 0 for tensors whose name contains ``lora_A`` (``[r, in]``, conv ``[r, Cin, k,
k]``) and dim 1 for ``lora_B`` (``[out, r]``, conv ``[Cout, r, 1, 1]``); only tensors with ndim >= 2
are rank-sliced (``lora_A`` is tested first). A rank slice is dropped when every one of its values
is +0.0 (bit pattern zero; a -0.0 keeps the slice, so the ``fp32`` round trip is bit-identical).
Other tensors pass through dense.

Per-tensor section of a rank-sliced tensor::

    kept    ceil(r/8) bytes: bit i (LSB-first) set iff rank slice i travels; unused bits zero
    values  value section of the kept sub-tensor (the rank axis shrunk to the kept count r'),
            grouped per dim-0 slice like a dense tensor (per kept rank for A, per output row for B)

A dense tensor's section is just its value section. The decoder zero-fills dropped slices.
"""

from __future__ import annotations

import math

import numpy as np

from .arrays import as_bytes
from .binary import pack_bitmap, unpack_bitmap
from .codec import Sparsifier, register, slice_groups

__all__ = ["Ranks", "rank_axis"]


def rank_axis(name: str, ndim: int) -> int | None:
    """The rank axis of a LoRA factor by name (``lora_A`` -> 0, ``lora_B`` -> 1), else None."""
    if ndim < 2:
        return None
    if "lora_A" in name:
        return 0
    if "lora_B" in name:
        return 1
    return None


def _kept_slices(x: np.ndarray, axis: int) -> np.ndarray:
    r = x.shape[axis]
    if r == 0:  # no rank slice at all (reshape(0, -1) is undefined)
        return np.zeros(0, np.int64)
    bits = x.view(np.uint32)
    if axis == 0:
        nz = bits.reshape(r, -1).any(axis=1)
    else:
        nz = bits.reshape(x.shape[0], r, -1).any(axis=(0, 2))
    return np.flatnonzero(nz)


@register
class Ranks(Sparsifier):
    """Drop all-zero LoRA rank slices (rows of A, columns of B)."""

    codec_id = "ranks"

    def _plan(self, name, x):
        axis = rank_axis(name, x.ndim)
        if axis is None:
            return None, None, x
        kept = _kept_slices(x, axis)
        sub = x if kept.size == x.shape[axis] else np.take(x, kept, axis=axis)
        return axis, kept, np.ascontiguousarray(sub)

    def encode_all(self, items, vc, out):
        for name, x in items:
            axis, kept, sub = self._plan(name, x)
            if axis is not None:
                out.append(as_bytes(pack_bitmap(kept, x.shape[axis])))
            vc.encode_values(sub, slice_groups(sub.shape), out)

    def size_all(self, items, vc):
        size = 0
        for name, x in items:
            axis, kept, sub = self._plan(name, x)
            if axis is not None:
                size += (x.shape[axis] + 7) // 8
            size += vc.values_size(sub, slice_groups(sub.shape))
        return size

    def max_size(self, name, shape, vc):
        axis = rank_axis(name, len(shape))
        head = 0 if axis is None else (shape[axis] + 7) // 8
        return head + vc.max_values_size(math.prod(shape), slice_groups(shape))

    def max_expansion(self):
        # a policy, not a format limit: the kept slices average at least 1/16 of each factor
        return 16.0

    def decode_all(self, r, table, vc):
        out = {}
        for name, shape in table:
            axis = rank_axis(name, len(shape))
            if axis is None:
                out[name] = vc.decode_values(r, shape, slice_groups(shape), name)
                continue
            nr = shape[axis]
            p = r.array("u1", (nr + 7) // 8, f"kept ranks of {name!r}")
            kept = unpack_bitmap(p, nr, f"kept ranks of {name!r}")
            sub_shape = shape[:axis] + (kept.size,) + shape[axis + 1:]
            sub = vc.decode_values(r, sub_shape, slice_groups(sub_shape), name)
            if kept.size == nr:
                out[name] = sub
                continue
            dense = np.zeros(shape, np.float32)
            if kept.size:
                if axis == 0:
                    dense[kept] = sub
                else:
                    dense[:, kept] = sub
            out[name] = dense
        return out
