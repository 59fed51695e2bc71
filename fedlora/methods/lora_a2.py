"""LoRA-A2 (Koo et al., arXiv 2410.22815, ACL 2025): alternating freeze + adaptive rank selection.

Rounds are 1-indexed: odd rounds train and send B with A frozen, even rounds A with B frozen.
Each round each client scores every rank of every LoRA module after a ``score-epochs`` pass
(discarded), keeps the top ``r_i·N`` (module, rank) pairs over the whole model (``rank-budget``
or its tier's ``tier-rank``), trains ``local-epochs`` with updates confined to the selected
slices (B's learning rate ``lr-b-ratio`` × A's) and uploads the masked delta of the trained
factor through the ``ranks`` codec. Server: factor += Σ_k w_k · ΔF_k ⊙ M_k, w_k = |D_k| / Σ|D|
(unselected ranks zero-filled, not re-normalised). The download is the dense global adapter
(with ``download=delta`` only the changed rank slices); non-LoRA trainable tensors travel as
dense deltas. The algorithm step by step: docs/methods.md ("LoRA-A2 and its baselines").
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from ..adapters import (as_matrices, is_lora_key, load_state, lora_modules, rank_mask,
                        state_to_numpy, trainable_params, travelling_state)
from ..config import tier_value
from ..compression.ranks import Ranks
from ..strategies import guard
from ..strategies.base import ClientResult, ClientRound, FedLoraStrategy, MalformedReply
from ..strategies.protocol import TrainReply, Uploads


def trains_b(server_round: int) -> bool:
    """Alg. 1 of the paper with 1-indexed rounds: odd rounds train B."""
    return server_round % 2 == 1


def factor_keys(names, server_round: int) -> list[str]:
    """Keys uploaded this round: the trained factor of every module + non-LoRA trainables."""
    tag = ".lora_B." if trains_b(server_round) else ".lora_A."
    return [k for k in names if tag in k or not is_lora_key(k)]


class LoRAA2(FedLoraStrategy):
    name = "lora-a2"
    adapter = True
    uploads = Uploads.UPDATES

    def __init__(self, cfg, shapes) -> None:
        super().__init__(cfg, shapes)
        # uploads go through 'ranks|<codec-up>', delta downloads through 'ranks|<codec-down>'
        self.ensure_no_sparsifier(up=True, down=self.downlink.delta)
        if not lora_modules(list(shapes)):
            raise ValueError("lora-a2 needs LoRA A/B pairs in the adapter")

    def budget(self, node_id: int | None) -> int:
        return int(tier_value(self.cfg.tier_rank, self.tier_of(node_id), self.cfg.rank_budget))

    def upload_pipeline(self, server_round, node_id):
        return super().upload_pipeline(server_round, node_id).with_sparsifier(Ranks())

    def download_pipeline(self, server_round, node_id):
        """With ``download=delta`` a round's delta holds only the rank slices some client
        changed (and the dense non-LoRA tensors): ``ranks`` sends just those."""
        pipe = super().download_pipeline(server_round, node_id)
        return pipe.with_sparsifier(Ranks()) if self.downlink.delta else pipe

    def upload_shapes(self, server_round):
        return {k: self.shapes[k] for k in factor_keys(self.shapes, server_round)}

    def node_config(self, server_round, node_id):
        return {"rank_budget": self.budget(node_id)}

    def validate_update(self, server_round, up):
        """A reply carries at most the rank slices its node's budget allows: ``rank-budget``
        (or its tier's ``tier-rank``) × the number of LoRA modules, over the trained factor
        (a slice counts when any of its values is non-zero); more is refused, not truncated.
        Not under ``dp=local``: the node's noise covers every rank, so every slice travels."""
        if self.privacy.enabled and not self.privacy.central:
            return
        mods = lora_modules(list(self.shapes))
        allowed = min(self.budget(up.node_id) * len(mods),
                      sum(self.shapes[ka][0] for ka, _ in mods.values()))
        carried = sum(len(guard.carried_ranks(k, v)) for k, v in up.tensors.items()
                      if is_lora_key(k))
        if carried > allowed:
            raise MalformedReply(f"{carried} rank slices uploaded; the node's rank budget "
                                 f"({self.budget(up.node_id)} × {len(mods)} modules) allows "
                                 f"{allowed}")

    def aggregate_updates(self, server_round, state, updates):
        total = float(sum(u.weight for u in updates))
        out = OrderedDict((k, v.copy()) for k, v in state.items())
        for k in factor_keys(state, server_round):
            acc = np.zeros(state[k].shape, dtype=np.float64)
            for u in updates:
                acc += (u.weight / total) * u.tensors[k]
            out[k] = (state[k] + acc).astype(np.float32)
        return out


def rank_scores(start, delta, server_round: int) -> "OrderedDict[tuple[str, int], float]":
    """S[(module, i)] = ‖ΔB[:,i]‖·‖A[i,:]‖ (odd rounds) or ‖B[:,i]‖·‖ΔA[i,:]‖ (even)."""
    scores = OrderedDict()
    for mod, (ka, kb) in lora_modules(list(start)).items():
        if trains_b(server_round):
            a, db = as_matrices(start[ka], delta[kb])
            s = np.linalg.norm(db, axis=0) * np.linalg.norm(a, axis=1)
        else:
            da, b = as_matrices(delta[ka], start[kb])
            s = np.linalg.norm(b, axis=0) * np.linalg.norm(da, axis=1)
        for i, v in enumerate(s):
            scores[(mod, i)] = float(v)
    return scores


def select_ranks(scores, budget: int, num_modules: int) -> dict[str, list[int]]:
    """Top ``budget · num_modules`` (module, rank) pairs over the whole model (ties: first)."""
    k = min(budget * num_modules, len(scores))
    keys = list(scores)
    vals = np.array([scores[key] for key in keys])
    order = np.argsort(-vals, kind="stable")[:k]
    chosen: dict[str, list[int]] = {}
    for j in sorted(order):
        mod, i = keys[j]
        chosen.setdefault(mod, []).append(i)
    return chosen


def _freeze_other_factor(params, server_round: int) -> list[str]:
    """requires_grad off for the factor not trained this round; returns the trained keys."""
    keys = factor_keys(params, server_round)
    for k, p in params.items():
        p.requires_grad_(k in keys)
    return keys


def _groups(params, keys, cr: ClientRound) -> list[dict]:
    lr = cr.lr
    lr_b = lr * cr.cfg.lr_b_ratio
    return [{"params": [params[k]], "lr": lr_b if ".lora_B." in k else lr} for k in keys]


def client_train(cr: ClientRound) -> ClientResult:
    cfg, rnd = cr.cfg, cr.server_round
    budget = cr.ins.rank_budget if cr.ins.rank_budget is not None else cfg.rank_budget
    data = cr.data()
    start = OrderedDict((k, np.asarray(v, np.float32)) for k, v in cr.received.items())

    # 1-2. scoring pass from the global adapter (its update is discarded)
    scout = cr.task.new_model(adapter=True)
    load_state(scout, start)
    params = trainable_params(scout)
    keys = _freeze_other_factor(params, rnd)
    cr.task.train(scout, data, seed=cr.seed + 1, epochs=cfg.score_epochs,
                  param_groups=_groups(params, keys, cr))
    after = state_to_numpy(travelling_state(scout))
    scores = rank_scores(start, {k: after[k] - start[k] for k in start}, rnd)
    mods = lora_modules(list(start))
    chosen = select_ranks(scores, budget, len(mods))

    # 3-4. masked local training from the global adapter
    model = cr.task.new_model(adapter=True)
    load_state(model, start)
    params = trainable_params(model)
    keys = _freeze_other_factor(params, rnd)
    masks = {}
    for k in keys:
        if is_lora_key(k):
            mod = k.rsplit(".lora_", 1)[0]
            masks[k] = torch.from_numpy(rank_mask(k, start[k].shape, chosen.get(mod, [])))
    frozen = {k: torch.from_numpy(start[k].copy()) for k in masks}

    def on_device() -> None:  # the task moves the model to its device (GPU) before training
        for k in masks:
            if masks[k].device != params[k].device:
                masks[k] = masks[k].to(params[k].device)
                frozen[k] = frozen[k].to(params[k].device)

    def grad_hook() -> None:
        on_device()
        for k, m in masks.items():
            if params[k].grad is not None:
                params[k].grad.mul_(m)

    @torch.no_grad()
    def step_hook() -> None:
        for k, m in masks.items():
            params[k].copy_(torch.where(m, params[k], frozen[k]))

    metrics = cr.task.train(model, data, seed=cr.seed, grad_hook=grad_hook,
                            step_hook=step_hook, param_groups=_groups(params, keys, cr))
    trained = state_to_numpy(travelling_state(model))
    upload = OrderedDict()
    for k in keys:
        d = trained[k] - start[k]
        upload[k] = np.where(masks[k].cpu().numpy(), d, 0.0).astype(np.float32) if k in masks else d
    return ClientResult(upload, TrainReply(
        len(data[1]), metrics, ranks_selected=float(sum(len(v) for v in chosen.values())),
        params_up=float(sum(int(np.count_nonzero(masks[k].cpu().numpy())) if k in masks
                            else upload[k].size for k in upload))))


Strategy = LoRAA2
