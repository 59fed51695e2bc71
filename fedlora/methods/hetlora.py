"""HetLoRA baseline (Cho et al. 2024) as compared in LoRA-A2: heterogeneous client ranks,
zero-padding aggregation and rank self-pruning with decay γ = ``hetlora-gamma`` (0.99).

* Node k trains at rank r_k (from ``rank-budget``/``tier-rank``; then its own pruned rank): it
  receives the global adapter truncated to r_k (slices ≥ r_k zero) and uploads A and B; the
  ``ranks`` codec drops the zero slices, so bytes scale with r_k.
* Server: zero-padding aggregation — every upload is the full-rank tensor with zeros beyond r_k;
  A and B are averaged weighted by |D_k| (HetLoRA's optional norm-based weighting is not used).
* Self-pruning (client side): with r' = ⌊γ·r_k⌋ (at least one rank fewer), if local training
  shrank the contribution ‖B[:, r':r_k]·A[r':r_k, :]‖_F of the tail ranks compared to what the
  client received, the client prunes to r' and reports it (metric ``rank``); the server uses it
  from then on. HetLoRA's extra regulariser on the tail ranks is not applied.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np

from ..adapters import as_matrices, lora_modules
from . import flexlora, flocora
from ..strategies.base import ClientResult, ClientRound, MalformedReply, weighted_mean


class HetLoRA(flexlora.FlexLoRA):
    name = "hetlora"

    def __init__(self, cfg, shapes) -> None:
        super().__init__(cfg, shapes)
        self.pruned: dict[int, int] = {}   # node id → rank after self-pruning

    def client_rank(self, node_id) -> int:
        r = super().client_rank(node_id)
        return min(r, self.pruned.get(node_id, r))

    def node_config(self, server_round, node_id):
        return {"rank_budget": self.client_rank(node_id),
                "hetlora_gamma": self.cfg.hetlora_gamma}

    def state_dict(self):
        """FlexLoRA's state + the pruned ranks, by node id and (for nodes whose partition-id is
        known) by partition-id: a simulation restart gives nodes new ids, and their pruned ranks
        follow their partitions (:meth:`learn_tiers`)."""
        by_part = {self.partitions[n]: r for n, r in self.pruned.items()
                   if self.partitions.get(n, -1) >= 0}
        return {**super().state_dict(), "pruned": dict(self.pruned),
                "pruned_by_partition": by_part}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pruned = {int(n): int(r) for n, r in state["pruned"].items()}
        self._pruned_by_partition = {int(p): int(r)
                                     for p, r in state["pruned_by_partition"].items()}

    def learn_tiers(self, grid, node_ids, stats):
        """Base behaviour; then, after a resume, a node seen for the first time whose
        partition-id had a pruned rank under its old node id takes that rank over."""
        super().learn_tiers(grid, node_ids, stats)
        by_part = getattr(self, "_pruned_by_partition", None)
        if by_part:
            for n in node_ids:
                p = self.partitions.get(n, -1)
                if n not in self.pruned and p >= 0 and p in by_part:
                    self.pruned[n] = by_part[p]

    def validate_update(self, server_round, up):
        """A reported ``rank`` (already known finite) must be an integer in 1..global rank, and
        the reply carry no rank slice at or beyond the smaller of it and the node's rank."""
        r = up.reply.rank
        if r is not None:
            full = max(s[0] for k, s in self.shapes.items() if ".lora_A." in k)
            if r != int(r) or not 1 <= r <= full:
                raise MalformedReply(f"rank {r!r} must be an integer in 1..{full}")
        rank = self.client_rank(up.node_id)  # no slice beyond its rank (or the one it pruned to)
        self.check_rank_slices(up, min(rank, int(r if r is not None else rank)))

    def aggregate_updates(self, server_round, state, updates):
        for u in updates:
            if u.reply.rank is not None:
                self.pruned[u.node_id] = min(self.client_rank(u.node_id), int(u.reply.rank))
        return weighted_mean(updates)


def tail_norm(state, lo: int, hi: int) -> float:
    """Σ over modules of ‖B[:, lo:hi]·A[lo:hi, :]‖_F."""
    total = 0.0
    for ka, kb in lora_modules(list(state)).values():
        a, b = as_matrices(state[ka], state[kb])
        total += float(np.linalg.norm(b[:, lo:hi].astype(np.float64) @ a[lo:hi]))
    return total


def client_train(cr: ClientRound) -> ClientResult:
    ins = cr.ins
    rank = ins.rank_budget if ins.rank_budget is not None else int(cr.cfg.rank_budget)
    gamma = ins.hetlora_gamma if ins.hetlora_gamma is not None else float(cr.cfg.hetlora_gamma)
    res = flocora.client_train(cr)
    new_rank = rank
    lo = min(int(np.floor(gamma * rank)), rank - 1)
    if lo >= 1:
        before = tail_norm(cr.received, lo, rank)
        after = tail_norm(res.upload, lo, rank)
        if before > 0 and after < before:
            new_rank = lo
            for k in list(res.upload):   # the pruned slices are not sent any more
                if ".lora_A." in k:
                    res.upload[k][lo:] = 0.0
                elif ".lora_B." in k:
                    res.upload[k][:, lo:] = 0.0
    return ClientResult(OrderedDict(res.upload),
                        dataclasses.replace(res.reply, rank=float(new_rank)))


Strategy = HetLoRA
