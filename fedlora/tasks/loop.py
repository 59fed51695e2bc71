"""The one local-training loop both tasks use: seeded shuffling, hooks for methods' masks."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def resolve_device(spec: str) -> torch.device:
    """The torch device for run-config ``device``: ``auto`` (CUDA when torch sees a GPU, else
    CPU), ``cpu``, ``cuda`` or ``cuda:N``; a GPU that is not there raises ValueError naming it."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"run-config 'device' must be auto, cpu, cuda or cuda:N, got {spec!r}"
                         ) from err
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"run-config 'device' must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"run-config device={spec!r}, but torch sees no CUDA GPU on this node "
                         f"(torch {torch.__version__}); use device='auto' or 'cpu'")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"run-config device={spec!r}, but this node has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def to_device(batch, device: torch.device):
    """A tensor, or a dict of tensors, on ``device`` (no copy when already there)."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def make_optimizer(params, optimizer: str, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9, nesterov: bool = True) -> torch.optim.Optimizer:
    """``sgd`` (momentum, Nesterov) or ``adamw``; ``params`` may be torch param groups whose
    own ``lr`` overrides ``lr``."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum,
                               nesterov=nesterov and momentum > 0, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")


def train_epochs(model: nn.Module, n: int, epochs: int, batch_size: int, seed: int,
                 batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                 opt: torch.optim.Optimizer, grad_hook=None, step_hook=None
                 ) -> dict[str, float]:
    """``epochs`` passes over ``n`` examples in seeded random minibatches; ``batch_loss(idx,
    gen)`` computes a batch's loss. ``grad_hook()`` runs after backward (e.g. gradient masks),
    ``step_hook()`` after each optimizer step (e.g. restore frozen entries). The global torch
    RNG (dropout) is seeded too, inside a fork, so a call is reproducible (on a GPU up to
    cuDNN's own nondeterminism). Batches are drawn on the CPU; ``batch_loss`` moves them to the
    model's device. A node's ``max-local-steps`` (node config, :mod:`fedlora.node`) stops the
    loop after that many steps."""
    from ..node import current

    max_steps = current().max_local_steps  # the node's own cap (node config), 0 = none
    gen = torch.Generator().manual_seed(int(seed))
    total, steps = 0.0, 0
    model.train()
    dev = model_device(model)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()
            ] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int(seed))
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                if max_steps and steps >= max_steps:
                    break
                idx = perm[start: start + batch_size]
                opt.zero_grad(set_to_none=True)
                loss = batch_loss(idx, gen)
                loss.backward()
                if grad_hook is not None:
                    grad_hook()
                opt.step()
                if step_hook is not None:
                    step_hook()
                total += float(loss.detach())
                steps += 1
    if steps and not math.isfinite(total):
        raise FloatingPointError("local training diverged (non-finite loss)")
    return {"train-loss": total / max(steps, 1), "train-steps": float(steps)}
