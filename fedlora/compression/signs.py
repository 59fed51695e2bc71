"""``sign`` — scaled sign (1 bit per value, one float32 scale per slice).

EF-SignSGD's compressor (Karimireddy et al., 2019): a slice ``x`` of ``m`` values travels as its
signs and ``s = mean(|x|)`` and decodes to ``s * sign(x)`` — the closest such vector to ``x``,
and contractive (``||x - s*sign(x)||^2 <= (1 - 1/m) ||x||^2``), so it is a codec for *updates*
with error feedback (``upload=delta`` / ``download=delta``), not for weights. One scale per
dim-0 slice of a dense tensor with ndim >= 2, per tensor after ``topk``, and a tensor the hint
leaves unsliced (norms, biases) is ONE slice; ``sign:tensor``: one slice per tensor. The decoder
refuses negative or non-finite scales, set padding bits and set sign bits in a slice of scale 0;
decoded values are ``+-s``, always finite. ``max_expansion``: 32.

Why not ``affine:1``, the grouping rationale and the value section: docs/wire-format.md
(``sign``).
"""

from __future__ import annotations

import math

import numpy as np

from .arrays import as_bytes, check_finite
from .binary import Reader, pack_bits, packed_len
from .codec import ValueCoder, register
from .errors import CodecError, SpecError

__all__ = ["Sign", "sign_scales"]

#: ``_SIGN_MASKS[b, j]``: the float32 sign bit where bit ``j`` of byte ``b`` is set (LSB first,
#: as ``binary.pack_bits`` packs them), else 0
_SIGN_MASKS = (((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.uint32) << 31)


def sign_scales(x2: np.ndarray) -> np.ndarray:
    """float32 ``mean(|x|)`` of each row of ``x2`` (``[g, m]``, finite), summed in float64."""
    if x2.shape[1] == 0:
        return np.zeros(x2.shape[0], np.float32)
    return (np.abs(x2).sum(axis=1, dtype=np.float64) / x2.shape[1]).astype(np.float32)


@register
class Sign(ValueCoder):
    """Scaled sign, one bit per value (see the module docstring)."""

    codec_id = "sign"
    for_updates_only = True

    def __init__(self, per_tensor: bool = False):
        self.per_tensor = bool(per_tensor)

    @classmethod
    def from_args(cls, args):
        if args == []:
            return cls()
        if args == ["tensor"]:
            return cls(per_tensor=True)
        raise SpecError("sign takes no argument or 'tensor' (one scale per tensor): "
                        "sign, sign:tensor")

    def spec_part(self):
        return "sign:tensor" if self.per_tensor else "sign"

    def get_config(self):
        return {"id": self.codec_id, "per_tensor": self.per_tensor}

    @classmethod
    def from_config(cls, cfg):
        cls.check_config_keys(cfg, ("per_tensor",))
        per_tensor = cfg.get("per_tensor", False)
        if not isinstance(per_tensor, bool):
            raise SpecError(f"sign: per_tensor must be true or false, got {per_tensor!r}")
        return cls(per_tensor)

    def _slices(self, n: int, groups: int) -> int:
        return groups if groups > 0 and not self.per_tensor else int(n > 0)

    def max_expansion(self):
        return 32.0

    def values_size(self, x, groups):
        return self.max_values_size(x.size, groups)

    def max_values_size(self, n, groups):
        return 4 * self._slices(n, groups) + packed_len(n, 1)

    def encode_values(self, x, groups, out):
        g = self._slices(x.size, groups)
        if not g:
            return
        check_finite(x)
        x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(g, -1)
        s = sign_scales(x2)
        neg = np.signbit(x2) & (x2 != 0)
        neg[s == 0] = False  # a mean below float32's smallest subnormal: the slice decodes to 0
        out.append(as_bytes(s.astype("<f4")))
        out.append(as_bytes(pack_bits(neg, 1)))

    def decode_values(self, r: Reader, shape, groups, name):
        n = math.prod(shape)
        g = self._slices(n, groups)
        if not g:
            return np.zeros(shape, np.float32)
        if n % g:
            raise CodecError(f"tensor {name!r}: {n} values do not split into {g} slices")
        need = 4 * g + packed_len(n, 1)
        if need > r.remaining:
            raise CodecError(f"truncated payload: sign section of {name!r} needs {need} bytes, "
                             f"{r.remaining} left")
        s = r.array("<f4", g, f"scales of {name!r}").astype(np.float32)
        if not (float(s.min()) >= 0 and float(s.max()) < math.inf) or np.signbit(s).any():
            raise CodecError(f"tensor {name!r}: negative or non-finite sign scale")  # NaN, -0.0
        nb = packed_len(n, 1)
        p = r.array("u1", nb, f"signs of {name!r}")
        used = n - 8 * (nb - 1)
        if used < 8 and int(p[-1]) >> used:
            raise CodecError(f"tensor {name!r}: non-zero padding bits in signs")
        # each byte's 8 sign bits as float32 sign masks by table (one gather), OR-ed with the
        # slice's scale: the bits of s or -s (s >= 0), what negating s where a bit is set gave,
        # in two passes instead of an unpack and a masked negate (docs/codecs-subbit.md, Speed)
        bits = _SIGN_MASKS[p].reshape(-1)[:n].reshape(g, -1)
        zero = s == 0
        if zero.any() and bits[zero].any():  # the encoder sends a zero slice as all "+"
            raise CodecError(f"tensor {name!r}: sign bits set in a slice of scale 0")
        np.bitwise_or(bits, s.view(np.uint32)[:, None], out=bits)
        return bits.view(np.float32).reshape(shape)
