"""Float casts: ``fp32`` (raw, lossless), ``fp16`` and ``bf16`` (2 bytes per value on the wire).

Value section of ``n`` values: ``n`` little-endian float32 (``fp32``), IEEE binary16 (``fp16``) or
bfloat16 (``bf16``: the top 16 bits of the float32 pattern, rounded to nearest, ties to even). The
``groups`` hint is ignored. Decoding returns float32. Out-of-range values saturate to the largest
finite value of the narrow type (65504 for fp16, ~3.39e38 for bf16) instead of becoming Inf, so a
payload never carries Inf/NaN; a payload that does (hand-made) is rejected.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .base import CodecError, Reader, ValueCoder, _torch, as_bytes, check_finite, register

_TORCH_MIN = 1 << 15  # below this many values numpy is faster than a torch kernel launch
FP16_MAX = 65504.0
BF16_MAX_BITS = 0x7F7F


@register
class Fp32(ValueCoder):
    """Raw little-endian float32 (lossless)."""

    codec_id = "fp32"

    def encode_values(self, x, groups, out):
        check_finite(x, "input")
        out.append(as_bytes(np.ascontiguousarray(x, dtype="<f4")))

    def values_size(self, x, groups):
        return 4 * x.size

    def max_values_size(self, n, groups):
        return 4 * n

    def decode_values(self, r: Reader, shape, groups, name):
        n = math.prod(shape)
        raw = r.array("<f4", n, f"fp32 values of {name!r}")
        if n and not (math.isfinite(float(raw.min())) and math.isfinite(float(raw.max()))):
            raise CodecError(f"tensor {name!r}: NaN or Inf in decoded fp32 values")
        out = np.empty(shape, dtype=np.float32)
        out.reshape(-1)[...] = raw
        return out


def _reject_nonfinite16(u16: np.ndarray, exp_mask: int, name: str, kind: str) -> None:
    if u16.size and np.bitwise_and(u16, exp_mask).max(initial=0) == exp_mask:
        raise CodecError(f"tensor {name!r}: NaN or Inf in decoded {kind} values")


class _TwoByteCast(ValueCoder):
    """Shared sizing of the 16-bit casts: exactly 2 bytes a value."""

    def values_size(self, x, groups):
        return 2 * x.size

    def max_values_size(self, n, groups):
        return 2 * n


@register
class Fp16(_TwoByteCast):
    """IEEE half precision (saturating at +-65504)."""

    codec_id = "fp16"

    def encode_values(self, x, groups, out):
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CodecError("input contains NaN or Inf")
        if lo < -FP16_MAX or hi > FP16_MAX:
            x = np.clip(x, -FP16_MAX, FP16_MAX)
        if _torch is not None and x.size >= _TORCH_MIN:
            h = _torch.from_numpy(x.reshape(-1)).to(_torch.float16).numpy()
        else:
            h = x.reshape(-1).astype(np.float16)
        out.append(as_bytes(h.astype("<f2", copy=False)))

    def decode_values(self, r, shape, groups, name):
        n = math.prod(shape)
        u = r.array("<u2", n, f"fp16 values of {name!r}")
        _reject_nonfinite16(u, 0x7C00, name, "fp16")
        out = np.empty(shape, dtype=np.float32)
        if _torch is not None and n >= _TORCH_MIN:  # vectorized (F16C) widening; numpy's is scalar
            with warnings.catch_warnings():  # u is a read-only view of the payload; never written
                warnings.simplefilter("ignore")
                h = _torch.from_numpy(u.view(np.int16)).view(_torch.float16)
            _torch.from_numpy(out.reshape(-1)).copy_(h)
        else:
            out.reshape(-1)[...] = u.view("<f2")
        return out


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, saturating at the largest
    finite bf16. ``x`` must be finite. Reference numpy implementation."""
    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    r = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    r += u  # no wrap: |x| finite means u & 0x7fffffff <= 0x7f7fffff
    hi = (r >> np.uint32(16)).astype(np.uint16)
    _saturate_bf16(hi)
    return hi


def _saturate_bf16(hi: np.ndarray) -> None:
    over = (hi & 0x7F80) == 0x7F80
    if over.any():
        hi[over] = (hi[over] & 0x8000) | BF16_MAX_BITS


@register
class Bf16(_TwoByteCast):
    """bfloat16: 8-bit exponent like float32, 7-bit mantissa; 2 bytes per value."""

    codec_id = "bf16"

    def encode_values(self, x, groups, out):
        if x.size == 0:
            return
        check_finite(x, "input")
        if _torch is not None and x.size >= _TORCH_MIN:
            # torch's float->bfloat16 conversion is round-to-nearest-even on the bit pattern
            hi = _torch.from_numpy(x.reshape(-1)).to(_torch.bfloat16).view(_torch.int16)
            hi = hi.numpy().view(np.uint16)
            _saturate_bf16(hi)
        else:
            hi = bf16_bits(x)
        out.append(as_bytes(hi.astype("<u2", copy=False)))

    def decode_values(self, r, shape, groups, name):
        n = math.prod(shape)
        u = r.array("<u2", n, f"bf16 values of {name!r}")
        _reject_nonfinite16(u, 0x7F80, name, "bf16")
        out = np.empty(shape, dtype=np.float32)
        o = out.reshape(-1).view(np.uint32)
        np.left_shift(u, 16, out=o, dtype=np.uint32)
        return out
