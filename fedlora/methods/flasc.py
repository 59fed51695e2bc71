"""FLASC (Kuo et al., arXiv 2406.05233; authors' code imkevinkuo/flasc): dense local LoRA,
top-k sparse communication both ways, server AdamW.

Server: dense global trainable tensors and a server optimizer (``server-opt``: ``adamw``,
``sgd`` or ``avg``). Download: global top-k by weight magnitude at ``density-down``, recomputed
every round (``topk`` codec, then ``codec-down``'s value coder). Client: starts from the masked
global, trains every entry densely, uploads the global top-k of its update at ``density-up``.
Server step: pseudo-gradient = −(plain mean of the sparse deltas), one optimizer step;
evaluation uses the masked model. Also: the density schedule (``density-decay``,
``density-decay-rounds``), the pruning baselines (``flasc-freeze``) and per-tier densities
(``tier-density``). Details and formulas: docs/methods.md ("FLASC").
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import torch

from ..adapters import load_state, state_to_numpy, trainable_params, travelling_state
from ..compression import Pipeline, topk_mask
from ..compression.sparsify import TopK
from ..config import tier_value
from ..strategies import guard
from ..strategies.base import (ClientResult, ClientRound, FedLoraStrategy, RejectRound,
                              weighted_mean)
from ..strategies.protocol import TrainReply, Uploads

FREEZE_MODES = ("none", "client", "server")
SERVER_OPTS = ("adamw", "sgd", "avg")


def with_topk(density: float, pipe: Pipeline) -> Pipeline:
    """``pipe`` with a global ``topk`` at ``density`` (6 significant digits) as its sparsifier;
    ``pipe`` unchanged when d = 1."""
    return pipe if density >= 1.0 else pipe.with_sparsifier(TopK(float(f"{density:.6g}")))


class FLASC(FedLoraStrategy):
    name = "flasc"
    adapter = True
    uploads = Uploads.UPDATES
    stream_weights = "equal"  # its pseudo-gradient is the plain mean of the deltas

    def __init__(self, cfg, shapes) -> None:
        super().__init__(cfg, shapes)
        if cfg.flasc_freeze not in FREEZE_MODES:
            raise ValueError(f"flasc-freeze must be one of {FREEZE_MODES}, got {cfg.flasc_freeze!r}")
        if cfg.server_opt not in SERVER_OPTS:
            raise ValueError(f"server-opt must be one of {SERVER_OPTS}, got {cfg.server_opt!r}")
        for d in (cfg.density_down, cfg.density_up):
            if not 0.0 < d <= 1.0:
                raise ValueError(f"densities must be in (0, 1], got {d}")
        self.ensure_no_sparsifier(up=True, down=True)  # flasc adds its own top-k
        if self.downlink.delta:
            raise ValueError("flasc sends its own sparse download (top-k of the weights at "
                             "density-down); download='delta' is for the other methods")
        self._params: OrderedDict[str, torch.Tensor] | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._fixed_mask: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ densities and masks
    def density(self, base: float, server_round: int, node_id: int | None) -> float:
        d = tier_value(self.cfg.tier_density, self.tier_of(node_id), base)
        steps = (max(server_round, 1) - 1) // max(self.cfg.density_decay_rounds, 1)
        return float(min(1.0, d * self.cfg.density_decay ** steps))

    def download_state(self, server_round, state):
        if self.cfg.flasc_freeze != "server" or server_round <= 1:
            return state
        if self._fixed_mask is None:  # once, from the weights after the first (dense) round
            self._fixed_mask = topk_mask(state, self.density(self.cfg.density_down, 1, None))
        return OrderedDict((k, v * self._fixed_mask[k]) for k, v in state.items())

    def download_pipeline(self, server_round, node_id):
        d = self.density(self.cfg.density_down, server_round, node_id)
        if self.cfg.flasc_freeze == "server" and server_round <= 1:
            d = 1.0
        return with_topk(d, super().download_pipeline(server_round, node_id))

    def upload_pipeline(self, server_round, node_id):
        d = self.density(self.cfg.density_up, server_round, node_id)
        return with_topk(d, super().upload_pipeline(server_round, node_id))

    def node_config(self, server_round, node_id):
        return {"flasc_freeze": self.cfg.flasc_freeze}

    # ------------------------------------------------------------------ server step
    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        if self._params is None and self._global is not None:
            # the server optimizer's dense parameters are kept across rounds, as the global
            # is: made once, when the model is first known, not inside an aggregation
            self._optimizer(self._global)
        return messages

    def _optimizer(self, state) -> None:
        self._params = OrderedDict((k, torch.from_numpy(np.array(v, dtype=np.float32)))
                                   for k, v in state.items())
        params = list(self._params.values())
        if self.cfg.server_opt == "adamw":
            self._opt = torch.optim.AdamW(params, lr=self.cfg.server_lr,
                                          weight_decay=self.cfg.server_weight_decay)
        elif self.cfg.server_opt == "sgd":
            self._opt = torch.optim.SGD(params, lr=self.cfg.server_lr)
        else:
            self._opt = torch.optim.SGD(params, lr=1.0)

    def aggregate_updates(self, server_round, state, updates):
        """One server-optimizer step on −(mean delta). The pseudo-gradient must be finite and
        within the round's update-norm bound (the mean of bounded updates is), and the step must
        leave parameters and optimizer state finite; otherwise RejectRound, after restoring
        parameters and optimizer state exactly (an AdamW second moment driven to inf would
        freeze every later step). ``server-opt=avg`` has no optimizer state and is checked
        before the parameters take it, so it needs no checkpoint copy of the model."""
        if self._params is None:
            self._optimizer(state)
        avg = self.cfg.server_opt == "avg"
        if not avg:  # avg is checked before it is applied: nothing to restore
            self._checkpoint(server_round)
        n = len(updates)
        if n == 1 and all(updates[0].tensors[k].dtype == np.float64 for k in self._params):
            grads = OrderedDict((k, updates[0].tensors[k]) for k in self._params)  # (0 + x) / 1
        else:
            grads = weighted_mean(updates, list(self._params), equal=True)  # Σ x / n, float64
        norm = guard.update_norm(grads)
        if not math.isfinite(norm):
            self.rollback(server_round)
            raise RejectRound("FLASC pseudo-gradient is not finite")
        s = self.stats.get(server_round)
        bound = s.norm_bound if s is not None else None
        if bound is not None and norm > bound * (1 + 1e-5):
            self.rollback(server_round)
            raise RejectRound(f"FLASC pseudo-gradient norm {norm:.6g} is over the round's "
                              f"bound {bound:.6g}")
        if avg:  # SGD at lr 1 on −(mean delta), no state: p + mean, the same IEEE addition by
            # numpy (see _finite), formed in the arrays this round returns and checked before
            # the parameters take it: no checkpoint copy of the model, and no rollback to do
            new = OrderedDict()
            for k, p in self._params.items():
                new[k] = np.add(p.detach().numpy(), grads[k].astype(np.float32))
                if not _finite_array(new[k]):
                    raise RejectRound(f"the server avg step made {k} non-finite")
            for k, p in self._params.items():
                np.copyto(p.detach().numpy(), new[k])
            return new
        else:
            for k, p in self._params.items():
                p.grad = torch.from_numpy(-grads[k].astype(np.float32))
            self._opt.step()
            self._opt.zero_grad(set_to_none=True)
        bad = self._non_finite()
        if bad:
            self.rollback(server_round)
            raise RejectRound(f"the server {self.cfg.server_opt} step made {bad} non-finite")
        return OrderedDict((k, p.detach().numpy().copy()) for k, p in self._params.items())

    def _checkpoint(self, server_round: int) -> None:
        """Exact copies of the parameters and the optimizer state before this round's step."""
        self._saved = (server_round,
                       OrderedDict((k, _copy(p)) for k, p in self._params.items()),
                       copy.deepcopy(self._opt.state_dict()))

    def _non_finite(self) -> str:
        """The name of a parameter or optimizer-state tensor holding NaN/Inf ('' if none)."""
        for k, p in self._params.items():
            if not _finite(p):
                return k
            for name, v in self._opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.is_floating_point() and not _finite(v):
                    return f"{name} of {k}"
        return ""

    # ------------------------------------------------------------------ checkpoints (resume)
    def state_dict(self):
        """Base state + the server optimizer's parameters and full state and the fixed mask."""
        out = super().state_dict()
        out["flasc"] = {
            "params": (OrderedDict((k, p.detach().clone()) for k, p in self._params.items())
                       if self._params is not None else None),
            "optimizer": copy.deepcopy(self._opt.state_dict()) if self._opt is not None else None,
            "fixed_mask": dict(self._fixed_mask) if self._fixed_mask is not None else None,
        }
        return out

    def load_state_dict(self, state):
        super().load_state_dict(state)
        f = state["flasc"]
        self._params, self._opt = None, None
        if f["params"] is not None:
            self._optimizer(OrderedDict((k, t.numpy()) for k, t in f["params"].items()))
            self._opt.load_state_dict(f["optimizer"])
        self._fixed_mask = (None if f["fixed_mask"] is None else
                            {k: np.asarray(v, dtype=bool) for k, v in f["fixed_mask"].items()})

    def rollback(self, server_round: int) -> None:
        """Restore parameters and optimizer state to before ``server_round``'s step."""
        if self.cfg.server_opt == "avg" and self._params is not None and self._global:
            # no checkpoint (see aggregate_updates): avg's parameters are the global this round
            # was configured with, which the base class keeps when it rejects the round
            for k, p in self._params.items():
                np.copyto(p.detach().numpy(), self._global[k])
            return
        saved = getattr(self, "_saved", None)
        if saved is None or saved[0] != server_round or self._params is None:
            return
        _, params, opt_state = saved
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(params[k])
        self._opt.load_state_dict(opt_state)
        self._saved = None


def client_train(cr: ClientRound) -> ClientResult:
    """Dense local training from the masked global; upload the update (the codec takes its
    top-k)."""
    model = cr.task.new_model(adapter=True)
    load_state(model, cr.received)
    start = OrderedDict((k, np.asarray(v, np.float32)) for k, v in cr.received.items())
    hooks = {}
    if (cr.ins.flasc_freeze or "none") != "none":
        params = trainable_params(model)
        masks = {k: torch.from_numpy(start[k] != 0) for k in params}

        def grad_hook() -> None:
            for k, p in params.items():
                if p.grad is not None:
                    if masks[k].device != p.grad.device:  # the task moved the model (GPU)
                        masks[k] = masks[k].to(p.grad.device)
                    p.grad.mul_(masks[k])

        hooks["grad_hook"] = grad_hook
    data = cr.data()
    metrics = cr.task.train(model, data, seed=cr.seed, **hooks, lr=cr.lr)
    trained = state_to_numpy(travelling_state(model))
    delta = OrderedDict((k, trained[k] - start[k]) for k in start)
    n = sum(v.size for v in delta.values())
    density = getattr(cr.codec_up.sparsifier, "density", 1.0)
    return ClientResult(delta, TrainReply(len(data[1]), metrics, params_up=float(
        int(density * n) if density < 1.0 else n)))  # values sent


Strategy = FLASC


# numpy for the server step's whole-model passes around the optimizer: torch's OpenMP kernels
# stall when other processes hold the cores (the server beside its nodes; 0.4 s a round for
# the finiteness checks of a 2.3M-value adapter in benchmarks/aggregate.py), numpy's do not


def _finite(t: "torch.Tensor") -> bool:
    """Whether every value of a CPU float tensor is finite (two SIMD reductions; NaN fails)."""
    return _finite_array(t.detach().numpy())


def _finite_array(a: np.ndarray) -> bool:
    """:func:`_finite` of a numpy array."""
    return a.size == 0 or (math.isfinite(float(a.min())) and math.isfinite(float(a.max())))


def _copy(t: "torch.Tensor") -> "torch.Tensor":
    """An exact copy of a CPU tensor (a plain memory copy)."""
    return torch.from_numpy(t.detach().numpy().copy())
