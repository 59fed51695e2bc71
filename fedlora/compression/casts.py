"""Float casts: ``fp16`` and ``bf16`` (2 bytes per value on the wire); ``fp32`` (raw, lossless,
the same fixed-width base) lives in :mod:`.quantize`, whose compiled scanner reads it flat.

Value section of ``n`` values: ``n`` little-endian float32 (``fp32``), IEEE binary16 (``fp16``) or
bfloat16 (``bf16``: the top 16 bits of the float32 pattern, rounded to nearest, ties to even). The
``groups`` hint is ignored. Decoding returns float32. Out-of-range values saturate to the largest
finite value of the narrow type (65504 for fp16, ~3.39e38 for bf16) instead of becoming Inf, so a
payload never carries Inf/NaN; a payload that does (hand-made) is rejected. ``max_expansion``
(the decoder's memory contract, ``payload.py``): 1 for ``fp32``, 2 for the 2-byte casts.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .arrays import _torch, as_bytes, check_finite
from .codec import ValueCoder, register
from .errors import CodecError

_TORCH_MIN = 1 << 15  # below this many values numpy is faster than a torch kernel launch
FP16_MAX = 65504.0
BF16_MAX_BITS = 0x7F7F


class _FixedWidth(ValueCoder):
    """A cast of ``width`` bytes per value: sizes and the expansion factor follow from it."""

    width = 4

    def values_size(self, x, groups):
        return self.width * x.size

    def max_values_size(self, n, groups):
        return self.width * n

    def max_expansion(self):
        return 4.0 / self.width


class _TwoByteCast(_FixedWidth):
    """The 16-bit casts: a subclass supplies the conversions and the exponent mask that marks
    NaN/Inf in its bit patterns."""

    width = 2
    exp_mask = 0

    def _narrow(self, x: np.ndarray) -> np.ndarray:
        """Finite float32 ``x`` (CodecError otherwise) -> flat little-endian 2-byte array."""
        raise NotImplementedError

    def _widen(self, u: np.ndarray, out: np.ndarray) -> None:
        """Bit patterns ``u`` (``<u2``, read-only) -> float32 into the flat ``out``."""
        raise NotImplementedError

    def encode_values(self, x, groups, out):
        if x.size:
            out.append(as_bytes(self._narrow(x)))

    def decode_values(self, r, shape, groups, name):
        n = math.prod(shape)
        u = r.array("<u2", n, f"{self.codec_id} values of {name!r}")
        if n and np.bitwise_and(u, self.exp_mask).max() == self.exp_mask:
            raise CodecError(f"tensor {name!r}: NaN or Inf in decoded {self.codec_id} values")
        out = np.empty(shape, dtype=np.float32)
        self._widen(u, out.reshape(-1))
        return out


@register
class Fp16(_TwoByteCast):
    """IEEE half precision (saturating at +-65504)."""

    codec_id = "fp16"
    exp_mask = 0x7C00

    def _narrow(self, x):
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CodecError("input contains NaN or Inf")
        if lo < -FP16_MAX or hi > FP16_MAX:
            x = np.clip(x, -FP16_MAX, FP16_MAX)
        if _torch is not None and x.size >= _TORCH_MIN:
            h = _torch.from_numpy(x.reshape(-1)).to(_torch.float16).numpy()
        else:
            h = x.reshape(-1).astype(np.float16)
        return h.astype("<f2", copy=False)

    def _widen(self, u, out):
        if _torch is not None and u.size >= _TORCH_MIN:  # vectorized (F16C); numpy's is scalar
            with warnings.catch_warnings():  # u is a read-only view of the payload; never written
                warnings.simplefilter("ignore")
                h = _torch.from_numpy(u.view(np.int16)).view(_torch.float16)
            _torch.from_numpy(out).copy_(h)
        else:
            out[...] = u.view("<f2")


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
    exp_mask = 0x7F80

    def _narrow(self, x):
        check_finite(x)
        if _torch is not None and x.size >= _TORCH_MIN:
            # torch's float->bfloat16 conversion is round-to-nearest-even on the bit pattern
            hi = _torch.from_numpy(x.reshape(-1)).to(_torch.bfloat16).view(_torch.int16)
            hi = hi.numpy().view(np.uint16)
            _saturate_bf16(hi)
        else:
            hi = bf16_bits(x)
        return hi.astype("<u2", copy=False)

    def _widen(self, u, out):
        np.left_shift(u, 16, out=out.view(np.uint32), dtype=np.uint32)
