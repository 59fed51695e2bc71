"""fedlora codecs: numpy (+ optional torch) only, never Flower.

    from fedlora.compression import parse_spec, decode_payload
    pipe = parse_spec("topk:0.05|affine:4|zstd")
    payload = pipe.encode({"layer.lora_A": a, "layer.lora_B": b})
    tensors = decode_payload(payload, expected={"layer.lora_A": a.shape, "layer.lora_B": b.shape})

The core, one concern per module: ``errors`` (CodecError, SpecError), ``spec`` (grammar),
``payload`` (layout, :class:`Pipeline`, :func:`decode_payload`, the decoder's memory contract),
``codec`` (stage kinds and registry), ``binary`` (varints, bitmaps, bit packing, the
bounds-checked reader), ``arrays`` (tensor input, finiteness), ``runtime`` (thread pool, scratch
arena); ``feedback`` (:class:`ErrorFeedback`). One codec per module, registered by importing it
below: ``casts`` (fp32/fp16/bf16), ``quantize`` (affine:b), ``signs`` (sign), ``sparsify``
(topk), ``ranks``, ``lowrank``, ``lossless`` (zstd), ``eden`` (drive, eden:b; keyed by
``codec_key``). A new codec: docs/architecture.md ("Add a codec").
"""

from .codec import (  # noqa: F401
    Codec,
    LosslessCodec,
    Sparsifier,
    ValueCoder,
    register,
    registered_ids,
)
from .errors import CodecError, SpecError  # noqa: F401
from .payload import (  # noqa: F401
    DEFAULT_MAX_ELEMENTS,
    MAX_EXPANSION,
    OUTPUT_ALLOWANCE,
    Pipeline,
    decode_payload,
    parse_spec,
)
from . import casts, eden, lossless, lowrank, quantize, ranks, signs, sparsify  # noqa: F401  (registration)
from .eden import codec_key  # noqa: F401
from .feedback import ErrorFeedback  # noqa: F401
from .sparsify import topk_mask  # noqa: F401

__all__ = [
    "parse_spec", "decode_payload", "Pipeline", "CodecError", "SpecError", "ErrorFeedback",
    "topk_mask", "Codec", "Sparsifier", "ValueCoder", "LosslessCodec", "register",
    "registered_ids", "codec_key", "DEFAULT_MAX_ELEMENTS", "MAX_EXPANSION", "OUTPUT_ALLOWANCE",
]
