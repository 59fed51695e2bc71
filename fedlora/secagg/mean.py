"""The weighted secure mean: what a node puts into its masked vector and how the server turns the
unmasked sum back into a mean (no Flower, no crypto: plain integer arithmetic).

Weighted (``Params.weight_cap`` W > 0): node i with weight w_i (its ``num-examples``, capped to
[0, W]) clips x_i to ‖x_i‖₂ ≤ C, quantizes (w_i / W)·x_i on the scale s = L / C (stochastic
rounding: the integer is in [−L, L]) and appends w_i as one more coordinate (W ≤ L, so in
[−L, L] too). The ring's k = bits + ⌈log2 n⌉ + 1 bits hold any sum of n such coordinates
(|Σ| ≤ nL < 2^(k−1)): no overflow, by construction. The server unmasks Σ q_i and Σ w_i (exact)
and returns Σ q_i · W / (s · Σ w_i). Unweighted (W = 0): no weight coordinate, mean =
Σ q_i / (s · survivors). Error: within n·W / (s·Σw) of the plain weighted mean of the clipped
updates (≈ C/L per coordinate with weights near W; it grows as W / mean(w): pick W, i.e.
``max-examples-per-client``, close to the nodes' real weights). docs/secure-aggregation.md.
"""

from __future__ import annotations

import numpy as np

from . import ring
from .errors import SecAggError
from .protocol import Params


def node_vector(x: np.ndarray, weight: int, p: Params, rng: np.random.Generator) -> np.ndarray:
    """A node's integers for the masked input: ``x`` (the round's coordinates of its update,
    already clipped to ‖x‖₂ ≤ C) quantized — scaled by w/W first and followed by w when the
    round is weighted; ``weight`` is capped to [0, W] here (the node's own cap)."""
    x = np.asarray(x, np.float64).reshape(-1)
    if not p.weight_cap:
        if x.size != p.dim:
            raise SecAggError(f"{x.size} coordinates, the session masks {p.dim}")
        return ring.quantize(x, p.bits, p.clip, rng)
    if x.size != p.dim - 1:
        raise SecAggError(f"{x.size} coordinates, the session masks {p.dim - 1} + the weight")
    w = min(max(int(weight), 0), p.weight_cap)
    q = ring.quantize(x * (w / p.weight_cap), p.bits, p.clip, rng)
    return np.concatenate([q, np.array([w], np.int64)])


def survivors_mean(total: np.ndarray, p: Params, survivors: int) -> tuple[np.ndarray, int]:
    """The unmasked sum ``total`` (int64, ``dim`` values) → (the mean over the round's
    coordinates as float64, the weight it was divided by: Σ w_i, or the survivors' count).
    A weight sum outside [0 < Σw ≤ survivors·W] cannot come from honest nodes: SecAggError (the
    round is not applied; which node lied cannot be told — its input is masked)."""
    total = np.asarray(total, np.int64)
    if total.shape != (p.dim,) or survivors < 1:
        raise SecAggError(f"an unmasked sum of {total.shape} for {survivors} survivors")
    if not p.weight_cap:
        return total.astype(np.float64) / (p.scale * survivors), survivors
    wsum = int(total[-1])
    if not 0 < wsum <= survivors * p.weight_cap:
        raise SecAggError(f"the unmasked weight sum {wsum} is outside (0, {survivors} survivors "
                          f"× W = {survivors * p.weight_cap}]: a node sent a bad weight")
    return total[:-1].astype(np.float64) * (p.weight_cap / (p.scale * wsum)), wsum
