"""Which run configs secure aggregation accepts (numpy-free, Flower-free: the launcher's
validate.py and the strategy call the same :func:`check_config`)."""

from __future__ import annotations

from typing import Any

#: methods whose server step needs only the sum of the uploads (FLASC: with its dense upload,
#: ``density-up`` 1; the sparse set is ``secagg-density``'s shared one)
SUM_METHODS = ("fedavg", "flocora", "fl-lora", "ffa-lora", "lora-a2", "flasc")
#: those whose plain aggregation weights each reply by its ``num-examples``
WEIGHTED_METHODS = ("fedavg", "flocora", "fl-lora", "ffa-lora", "lora-a2")


def levels(bits: int) -> int:
    return (1 << (int(bits) - 1)) - 1


def weighted(cfg: Any, method: str) -> bool:
    """Whether the secure mean is weighted: the method's plain aggregation is (by num-examples),
    ``equal-weights`` is off, and there is no distributed noise (the exact weight sum would be
    released un-noised; as central DP, that mode keeps the unweighted mean)."""
    return (method in WEIGHTED_METHODS and not cfg.equal_weights
            and not cfg.secagg_noise > 0)


def weight_cap(cfg: Any) -> int:
    """W, the largest weight a node may put in: ``max-examples-per-client`` (the cap every node
    already applies to its local examples), or L = 2^(secagg-bits−1) − 1 when that is 0."""
    lv = levels(cfg.secagg_bits)
    return int(cfg.max_examples_per_client) if cfg.max_examples_per_client > 0 else lv


def check_config(cfg: Any, method: str) -> None:
    """The combinations secure aggregation refuses (ValueError naming the key); the launcher's
    validate.py calls the same function."""
    if not cfg.secure_aggregation:
        return
    if method not in SUM_METHODS:
        raise ValueError(f"secure-aggregation needs a method whose server step is the sum of the "
                         f"uploads ({', '.join(SUM_METHODS)}); {method} is not")
    if method not in ("lora-a2", "flasc") and cfg.upload != "delta":
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
    if method == "flasc" and cfg.density_up < 1:
        raise ValueError("secure-aggregation cannot mask FLASC's per-node top-k (the server "
                         "would read each node's positions): set density-up=1 and use "
                         "secagg-density (one random set per round, the same for every node)")
    if weighted(cfg, method) and 2 <= cfg.secagg_bits and weight_cap(cfg) > levels(cfg.secagg_bits):
        raise ValueError(f"secure-aggregation's weighted mean sends the weight as one masked "
                         f"coordinate <= L = 2^(secagg-bits-1)-1 = {levels(cfg.secagg_bits)}: "
                         f"max-examples-per-client {cfg.max_examples_per_client} is over it; "
                         f"lower it, raise secagg-bits, or set equal-weights=true")
    if cfg.secagg_rank_union and (method != "lora-a2" or cfg.secagg_density < 1
                                  or cfg.secagg_noise > 0):
        raise ValueError("secagg-rank-union is for lora-a2 without secagg-density < 1 or "
                         "secagg-noise (the slice indicators are summed exactly)")
    if cfg.secagg_neighbours and cfg.secagg_neighbours % 2:
        raise ValueError("secagg-neighbours must be even (a k-regular circulant graph)")
