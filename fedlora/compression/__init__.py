"""fedlora codecs: numpy (+ optional torch) only, never Flower.

    from fedlora.compression import parse_spec, decode_payload
    pipe = parse_spec("topk:0.05|affine:4|zstd")
    payload = pipe.encode({"layer.lora_A": a, "layer.lora_B": b})
    tensors = decode_payload(payload, expected={"layer.lora_A": a.shape, "layer.lora_B": b.shape})

Spec grammar, payload layout and hardening: :mod:`fedlora.compression.base`. One codec per module:
``casts`` (fp32/fp16/bf16), ``quantize`` (affine:b), ``sparsify`` (topk), ``ranks``, ``lossless``
(zstd); ``feedback`` holds :class:`ErrorFeedback`. A new codec = one module defining a
:class:`~fedlora.compression.base.Codec` subclass decorated with ``@register``, imported below.
"""

from .base import (  # noqa: F401
    DEFAULT_MAX_ELEMENTS,
    Codec,
    CodecError,
    LosslessCodec,
    Pipeline,
    Sparsifier,
    SpecError,
    ValueCoder,
    decode_payload,
    parse_spec,
    register,
    registered_ids,
)
from . import casts, lossless, quantize, ranks, sparsify  # noqa: F401  (registration)
from .feedback import ErrorFeedback  # noqa: F401
from .sparsify import topk_mask  # noqa: F401

__all__ = [
    "parse_spec", "decode_payload", "Pipeline", "CodecError", "SpecError", "ErrorFeedback",
    "topk_mask", "Codec", "Sparsifier", "ValueCoder", "LosslessCodec", "register",
    "registered_ids", "DEFAULT_MAX_ELEMENTS",
]
