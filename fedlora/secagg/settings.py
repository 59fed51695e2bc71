"""Which run configs secure aggregation accepts (numpy-free, Flower-free: the launcher's
validate.py and the strategy call the same :func:`check_config`)."""

from __future__ import annotations

from typing import Any

#: methods whose server step needs only the sum of the uploads
SUM_METHODS = ("fedavg", "flocora", "fl-lora", "ffa-lora", "lora-a2")


def check_config(cfg: Any, method: str) -> None:
    """The combinations secure aggregation refuses (ValueError naming the key); the launcher's
    validate.py calls the same function."""
    if not cfg.secure_aggregation:
        return
    if method not in SUM_METHODS:
        raise ValueError(f"secure-aggregation needs a method whose server step is the sum of the "
                         f"uploads ({', '.join(SUM_METHODS)}); {method} is not")
    if method != "lora-a2" and cfg.upload != "delta":
        raise ValueError("secure-aggregation sums updates: set upload='delta'")
    if not cfg.update_norm_bound > 0:
        raise ValueError("secure-aggregation needs a fixed update-norm-bound > 0: nodes clip to "
                         "it and it fixes the quantization scale (the server cannot measure "
                         "the norm of a masked update)")
    if cfg.dp != "off":
        raise ValueError("secure-aggregation adds DP noise itself (secagg-noise, distributed); "
                         "set dp='off'")
    if cfg.aggregation != "mean":
        raise ValueError("secure-aggregation reveals only the sum: aggregation must be 'mean'")
    if cfg.error_feedback or cfg.codec_up != "fp32" or cfg.tier_codec_up:
        raise ValueError("secure-aggregation replaces the upload codec (k-bit masked integers): "
                         "leave codec-up='fp32', tier-codec-up empty, error-feedback off")
    if cfg.secagg_neighbours and cfg.secagg_neighbours % 2:
        raise ValueError("secagg-neighbours must be even (a k-regular circulant graph)")
