"""FlexLoRA baseline (Bai et al. 2024): clients (each with its own rank r_k ≤ r_G, from
``rank-budget``/``tier-rank``) train A and B and upload both; the server forms
ΔW_m = Σ_k w_k B_k A_k per module, takes its SVD and keeps the top r_G components as the global
adapter, B = U_r·√S_r, A = √S_r·V_rᵀ (the split of Σ is not specified by the LoRA-A2 paper; the
symmetric split keeps both factors on the same scale). Each client receives the global truncated
to its rank (its slices ≥ r_k are zero, stay zero while training, and the ``ranks`` codec does not
send them). An ill-conditioned or failing SVD (non-finite ΔW, LinAlgError) keeps that module's
previous factors and is logged instead of crashing the round."""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from ..adapters import as_matrices, is_lora_key, lora_modules, truncate_ranks
from ..config import tier_value
from ..strategies import guard
from . import flocora
from ..compression.ranks import Ranks
from ..strategies.base import FedLoraStrategy, MalformedReply, weighted_mean

log = logging.getLogger("flwr.fedlora")


def svd_factors(delta_w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(B [out, r], A [r, in]) with B·A the best rank-r approximation of ``delta_w``; None when
    the SVD cannot be trusted."""
    if not np.all(np.isfinite(delta_w)):
        return None
    try:
        u, s, vt = np.linalg.svd(delta_w.astype(np.float64), full_matrices=False)
    except np.linalg.LinAlgError:
        return None
    r = min(rank, len(s))
    root = np.sqrt(s[:r])
    b = np.zeros((delta_w.shape[0], rank))
    a = np.zeros((rank, delta_w.shape[1]))
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vt[:r]
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    return b, a


class FlexLoRA(FedLoraStrategy):
    name = "flexlora"
    adapter = True

    def __init__(self, cfg, shapes) -> None:
        super().__init__(cfg, shapes)
        self.ensure_no_sparsifier(up=True)  # uploads go through 'ranks|<codec-up>'
        self.svd_failures = 0

    def state_dict(self):
        return {**super().state_dict(), "svd_failures": int(self.svd_failures)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.svd_failures = int(state["svd_failures"])

    def client_rank(self, node_id) -> int:
        full = max(s[0] for k, s in self.shapes.items() if ".lora_A." in k)
        return min(full, int(tier_value(self.cfg.tier_rank, self.tier_of(node_id),
                                        self.cfg.rank_budget)))

    def download_variant(self, server_round, node_id):
        return self.client_rank(node_id)

    def apply_variant(self, download, variant):
        return truncate_ranks(download, variant)

    def upload_pipeline(self, server_round, node_id):
        return super().upload_pipeline(server_round, node_id).with_sparsifier(Ranks())

    def node_config(self, server_round, node_id):
        return {"rank_budget": self.client_rank(node_id)}

    def update_reference(self, server_round, node_id):
        """A node trains from the global truncated to its rank: its update is measured (and
        clipped) from there."""
        return truncate_ranks(self._global, self.client_rank(node_id))

    def validate_update(self, server_round, up):
        """A reply carries no rank slice at or beyond its node's rank (``rank-budget`` or its
        tier's ``tier-rank``): more is refused, not truncated."""
        self.check_rank_slices(up, self.client_rank(up.node_id))

    def check_rank_slices(self, up, rank: int) -> None:
        for k, v in up.tensors.items():
            if is_lora_key(k):
                over = guard.carried_ranks(k, v)
                over = over[over >= rank]
                if over.size:
                    raise MalformedReply(f"{k} carries rank slice {int(over[0])}, beyond the "
                                         f"node's rank {rank}")

    def aggregate_updates(self, server_round, state, updates):
        total = float(sum(u.weight for u in updates))
        out = OrderedDict((k, v.copy()) for k, v in state.items())
        dense = [k for k in state if not is_lora_key(k)]
        if dense:
            out.update(weighted_mean(updates, dense))
        for mod, (ka, kb) in lora_modules(list(state)).items():
            rank = state[ka].shape[0]
            delta_w = 0.0
            for u in updates:
                a, b = as_matrices(u.tensors[ka], u.tensors[kb])
                delta_w = delta_w + (u.weight / total) * (b.astype(np.float64) @ a)
            factors = svd_factors(delta_w, rank)
            if factors is None:
                self.svd_failures += 1
                log.warning("round %d: SVD of %s failed or is ill-conditioned; keeping its "
                            "previous factors", server_round, mod)
                continue
            b, a = factors
            out[kb] = b.reshape(state[kb].shape).astype(np.float32)
            out[ka] = a.reshape(state[ka].shape).astype(np.float32)
        return out


client_train = flocora.client_train
Strategy = FlexLoRA
