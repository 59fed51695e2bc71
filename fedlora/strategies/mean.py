"""The one weighted mean of a round's uploads, Σ_i w_i·x_i / Σ_i w_i, for both aggregation paths.

:class:`WeightedSum` holds the float64 running sum and adds one upload at a time as
``acc += (w_i / W) · float64(x_i)`` (W: the round's total weight, fixed before the first add;
with ``equal`` weights ``acc += x_i``, divided by the count at the end), by the compiled passes
of :mod:`.kernels` (no FMA), in the order the caller adds: the decode-all path
(:func:`weighted_mean`, over decoded ClientUpdates) and streaming aggregation (:mod:`.stream`,
one reply at a time, with its dense, sectioned, top-k and flat inputs) are its two backends, so
they form the same sums in the same order and give the same bits. Each add also returns the
upload's sum of squares (its norm, :func:`.guard.update_norm`'s number).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np

from . import kernels


class WeightedSum:
    """Σ_i (w_i / W)·x_i in float64 (``equal``: Σ_i x_i) for tensors of ``shapes``."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], total: float,
                 equal: bool = False) -> None:
        self.equal = equal
        self.total = 1.0 if equal else float(total)
        self.acc = kernels.zeros_sum(shapes)

    def scale(self, weight: float) -> float:
        """The factor an upload of aggregation weight ``weight`` is added with."""
        return 1.0 if self.equal else weight / self.total

    def add(self, tensors: Mapping[str, np.ndarray], weight: float, reference=None,
            sign: float = 1.0) -> float:
        """``acc += sign · scale(weight) · (tensors)`` (dense; a negative ``sign`` takes an
        upload back exactly: acc + (−s)·x is acc − s·x in IEEE arithmetic); returns the sum of
        squares of ``tensors − reference``."""
        return kernels.add_and_sumsq(self.acc, tensors, sign * self.scale(weight), reference)

    def add_sparse(self, sections: Any, weight: float) -> float:
        """A top-k upload at its kept positions only: ``{name: SparseSection}`` or one
        ``FlatSparse`` (:func:`.kernels.sparse_add_and_sumsq` / :func:`.kernels.
        flat_add_and_sumsq`: the same bits as :meth:`add` of its dense tensors)."""
        if isinstance(sections, dict):
            return kernels.sparse_add_and_sumsq(self.acc, sections, self.scale(weight))
        return kernels.flat_add_and_sumsq(self.acc, sections, self.scale(weight))

    def add_sections(self, flats: Sequence[Any], weights: Sequence[float], reference=None
                     ) -> list[float]:
        """Dense ``affine``/``fp32`` uploads decoded tile by tile straight into the sum, each
        in turn (:func:`.kernels.sections_add_and_sumsq`: the same bits as :meth:`add` of each
        in order); their sums of squares."""
        return kernels.sections_add_and_sumsq(self.acc, list(flats),
                                              [self.scale(w) for w in weights], reference)

    def clear(self) -> None:
        for v in self.acc.values():
            v.fill(0.0)

    def mean(self, kept: Sequence[float]) -> "OrderedDict[str, np.ndarray]":
        """The mean of the uploads whose weights are ``kept`` (those added and not taken
        back): ``equal``: the sum over their count, float64 (FLASC's Σ x_i / n); else the sum
        rescaled to their total when uploads were left out after W was set, float32. Consumes
        the running sum (in place)."""
        if self.equal:
            for v in self.acc.values():
                v /= len(kept)
            return self.acc
        kept_total = float(sum(kept))
        if kept_total != self.total:
            for v in self.acc.values():
                v *= self.total / kept_total
        return OrderedDict((k, v.astype(np.float32)) for k, v in self.acc.items())


def weighted_mean(updates: Sequence[Any], keys: Sequence[str] | None = None,
                  equal: bool = False) -> "OrderedDict[str, np.ndarray]":
    """Σ_k w_k x_k / Σ_k w_k over each tensor (``keys``: those, default all of the first
    update's) of the ClientUpdates ``updates`` (their aggregation ``weight``), by
    :class:`WeightedSum`: float64, then float32 (``equal``: Σ x_k / n, float64). One update
    (not ``equal``): its tensors as float32, which is what that sum gives, without the float64
    copies."""
    keys = list(updates[0].tensors) if keys is None else list(keys)
    if len(updates) == 1 and not equal:
        return OrderedDict((k, np.array(updates[0].tensors[k], dtype=np.float32)) for k in keys)
    s = WeightedSum({k: np.shape(updates[0].tensors[k]) for k in keys},
                    sum(u.weight for u in updates), equal)
    for u in updates:
        s.add(OrderedDict((k, u.tensors[k]) for k in keys), u.weight)
    return s.mean([u.weight for u in updates])
