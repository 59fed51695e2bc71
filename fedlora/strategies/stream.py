"""Streaming aggregation: the server's memory is the running sum plus one decoded reply, not
every reply of the round.

For methods whose server step is a function of the uploads' mean (``stream_weights``:
``"examples"`` — fedavg, flocora, fl-lora, ffa-lora — or ``"equal"`` — FLASC), with
``aggregation=mean`` and no central DP, :func:`stream_mean` replaces "decode every reply, then
bound, then average": (1) validate every reply's metadata and cap the weights first; (2) decode,
check and add each reply's weighted value to a float64 running sum in the canonical reply order,
measuring its norm in the same pass, and free it (dense ``affine``/``fp32`` and ``topk`` replies
are read as sections, without a dense copy); (3) correct the sum for replies over the round's
norm bound, known only after the last one; (4) rescale to the survivors if replies were dropped.
The method's ``aggregate_updates`` then receives one pseudo-reply holding the weighted mean.
With no reply dropped or clipped the result is bit-identical to the decode-all path. Not
streamed: median / trimmed mean, central DP, LoRA-A2, FlexLoRA, HetLoRA. Every step, its
fast paths and why each is exact: docs/architecture.md ("Streaming aggregation").
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message

from ..wire import payload_bytes
from . import guard
from .mean import WeightedSum
from .replies import (ADAPTER_KEY, ClientUpdate, MalformedReply, decode_tensors, read_reply,
                      section_tensors, sections_apply, sparse_apply, sparse_tensors)

if TYPE_CHECKING:  # pragma: no cover
    from .base import FedLoraStrategy
    from .ledger import RoundStats

log = logging.getLogger("flwr.fedlora")


#: an update this many times over the bound is not corrected in place (float64 cancellation):
#: the round's sum is formed again with every scale known
RESUM_RATIO = 1e3


def streams(strategy: "FedLoraStrategy") -> bool:
    """Whether ``strategy`` aggregates this run by :func:`stream_mean`."""
    return (bool(strategy.cfg.stream_aggregation) and strategy.stream_weights is not None
            and strategy.robustness.aggregation == "mean"
            and not (strategy.privacy.enabled and strategy.privacy.central))


def _sectioned(strategy: "FedLoraStrategy", server_round: int, metas, want: dict, shapes,
               stats: "RoundStats"):
    """Step 2a's replies: when every reply's chain is one :func:`.replies.sections_apply`
    admits, the method checks nothing of its own (``validate_update``) and every node was
    sent the same reference (None for delta uploads, else one broadcast model): ``[(msg, up,
    flat sections, ref)]`` for the replies whose sections pass every check (the others
    dropped here, with the errors a decode gives), and no reply left for step 2b. Otherwise
    ``[]`` and ``metas`` unchanged."""
    if strategy.checks_updates or not metas:
        return [], metas
    pipes = [want.setdefault(up.node_id, strategy.upload_pipeline(server_round, up.node_id))
             for _, up in metas]
    refs = [strategy.update_reference(server_round, up.node_id) for _, up in metas]
    if not all(sections_apply(p) for p in pipes) or any(r is not refs[0] for r in refs):
        return [], metas
    out = []
    for (msg, up), pipe, ref in zip(metas, pipes, refs):
        try:
            flat = section_tensors(msg, up, pipe, shapes)
        except Exception as err:
            stats.drop(up.node_id, err)
            continue
        out.append((msg, up, flat, ref))
    return out, []


def stream_mean(strategy: "FedLoraStrategy", server_round: int, replies: list[Message],
                stats: "RoundStats") -> tuple[list[ClientUpdate], ClientUpdate | None]:
    """The round's valid replies (metadata only: their tensors are not kept) and one
    pseudo-reply holding their weighted mean (None when no reply survived). Bad replies are
    dropped into ``stats`` with their node id and reason, as on the decode-all path."""
    g = strategy.robustness
    metas: list[tuple[Message, ClientUpdate]] = []
    for msg in replies:                       # 1. metadata of every reply, no decoding
        try:
            metas.append((msg, read_reply(msg)))
        except Exception as err:
            stats.drop(msg.metadata.src_node_id, err)
    if not metas:
        return [], None
    guard.cap_reply_weights([u for _, u in metas], g, stats)
    want = {}                                 # node → pipeline, shapes: asked once per node
    shapes = strategy.upload_shapes(server_round)
    # the one weighted mean (mean.py); FLASC: Σ x_i, divided by the count at the end
    acc = WeightedSum(shapes, sum(u.weight for _, u in metas),
                      equal=strategy.stream_weights == "equal")
    kept: list[tuple[Message, ClientUpdate, Any, float]] = []

    def pipeline(up: ClientUpdate):
        """The codec chain the server asked of this node (made once a node and round)."""
        if up.node_id not in want:
            want[up.node_id] = strategy.upload_pipeline(server_round, up.node_id)
        return want[up.node_id]

    def decode(msg: Message, up: ClientUpdate) -> "OrderedDict[str, np.ndarray]":
        up.tensors = decode_tensors(msg, up, pipeline(up), shapes)
        strategy.validate_update(server_round, up)
        tensors, up.tensors = up.tensors, OrderedDict()
        return tensors

    broken = False                            # an add raised: the sum is formed again

    def keep(msg: Message, up: ClientUpdate, ref, n: float) -> None:
        stats.payload_up[up.node_id] = payload_bytes(msg.content.array_records[ADAPTER_KEY])
        stats.params_up[up.node_id] = int(up.reply.params_up or 0)
        kept.append((msg, up, ref, n))

    # 2a. dense affine / fp32 replies sharing one reference: every check first, then decoded
    # straight into the sum tile by tile (kernels.sections_add_and_sumsq: the same bits)
    sectioned, metas = _sectioned(strategy, server_round, metas, want, shapes, stats)
    if sectioned:
        sums = acc.add_sections([flat for *_, flat, _ in sectioned],
                                [up.weight for _, up, *_ in sectioned], sectioned[0][-1])
        for (msg, up, *_, ref), ss in zip(sectioned, sums):
            n = math.sqrt(ss)
            if not math.isfinite(n):  # finite float32 values cannot get here
                broken = True
                stats.drop(up.node_id,
                               MalformedReply(f"update norm {n} is not finite"))
                continue
            keep(msg, up, ref, n)
        sectioned = None                      # the sections (~1x the model in small arrays)
    plain = not strategy.checks_updates
    for msg, up in metas:                     # 2b. decode, check, add + measure (one pass), free
        try:
            ref = strategy.update_reference(server_round, up.node_id)
            # a top-k update (no reference to subtract, no checks of the method's own) is added
            # at its kept positions only: no dense copy of it (kernels.sparse_add_and_sumsq)
            sparse = ref is None and plain and sparse_apply(pipeline(up))
            tensors = (sparse_tensors(msg, up, pipeline(up), shapes, flat=True) if sparse
                       else decode(msg, up))
        except Exception as err:
            stats.drop(up.node_id, err)
            continue
        try:
            n = math.sqrt(acc.add_sparse(tensors, up.weight) if sparse
                          else acc.add(tensors, up.weight, ref))
            if not math.isfinite(n):  # finite float32 values cannot get here
                raise MalformedReply(f"update norm {n} is not finite")
        except Exception as err:  # whatever the sum may hold of it: formed again without it
            broken = True
            stats.drop(up.node_id, err)
            continue
        keep(msg, up, ref, n)
        del tensors
    # the one bounding step (FedLoraStrategy.bound_round): the bound, then each reply's scale
    scales = strategy.bound_round(server_round, [(up.node_id, n) for _, up, _, n in kept], stats)
    bound = stats.norm_bound
    worst = max((n for *_, n in kept), default=0.0)
    resum = broken or (bound is not None and worst > RESUM_RATIO * bound)
    if resum:  # correcting a huge addend would cancel the honest digits: sum again, scales known
        acc.clear()
    survivors: list[ClientUpdate] = []
    for (msg, up, ref, n), scale in zip(kept, scales):  # 3. those over the bound (or all)
        if scale is None or scale < 1.0 or resum:
            tensors = decode(msg, up)         # decoded and checked before: cannot fail now
            if scale is None:                 # rejected: taken out of the running sum
                if not resum:
                    acc.add(tensors, up.weight, sign=-1.0)
                continue
            if scale < 1.0:
                clipped = guard.clip_update(tensors, scale, ref)
                acc.add(clipped if resum else OrderedDict(
                    (k, clipped[k].astype(np.float64) - tensors[k]) for k in tensors), up.weight)
            else:
                acc.add(tensors, up.weight)
        survivors.append(up)
    if not survivors:
        return survivors, None
    # 4. the mean over the survivors (rescaled when replies were dropped after W was set;
    # FLASC: float64 Σ x_i / n, as its own step forms it)
    mean = acc.mean([u.weight for u in survivors])
    return survivors, ClientUpdate(-1, mean, int(sum(u.weight for u in survivors)), {})
