"""What both tasks share: the :class:`Task` protocol the methods' client halves are typed
against, one settings type derived from the run config, one evaluation loop, example capping, and
the base-model fingerprint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .loop import model_device, resolve_device


@dataclass
class TrainSettings:
    """One local-training configuration, for both tasks (fields of the run config)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    augment: bool = False   # vision: random crop + flip
    autocast: bool = False  # text: CPU bfloat16 autocast
    seed: int = 0

    @classmethod
    def from_config(cls, cfg, seed: int, epochs: int | None = None, lr: float | None = None,
                    ) -> "TrainSettings":
        """From a :class:`~fedlora.config.RunConfig`; ``epochs``/``lr`` override (a scoring pass,
        this round's rate under ``lr-schedule``)."""
        return cls(epochs=cfg.local_epochs if epochs is None else int(epochs),
                   batch_size=cfg.batch_size, lr=cfg.lr if lr is None else float(lr),
                   weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                   augment=cfg.augment, autocast=cfg.autocast_bf16, seed=int(seed))


class Task(Protocol):
    """What a method's client half may call (``fedlora.tasks.vision.VisionTask``,
    ``fedlora.tasks.text.TextTask``)."""

    kind: str
    num_classes: int

    def new_model(self, adapter: bool) -> nn.Module: ...

    def base(self) -> nn.Module: ...

    def fingerprint(self) -> str: ...

    def client_data(self, partition_id: int, num_partitions: int, data_dir: str = "") -> Any: ...

    def test_data(self) -> Any: ...

    def train(self, model: nn.Module, data, seed: int, epochs: int | None = None,
              lr: float | None = None, **hooks) -> dict[str, float]: ...

    def evaluate(self, model: nn.Module, data) -> dict[str, float]: ...


class TaskBase:
    """The shared half of a task: device, settings, the train entry point, capping, fingerprint.
    Subclasses implement ``new_model``, ``base``, ``client_data``, ``test_data``,
    ``_train(model, data, settings, **hooks)`` and ``evaluate``."""

    kind = ""
    example_bytes = 0  # one training example's tensors in memory (node config max-data-mb)

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)

    def train(self, model: nn.Module, data, seed: int, epochs: int | None = None,
              lr: float | None = None, **hooks) -> dict[str, float]:
        """Local training of ``model`` on ``data`` (hooks: see
        :func:`fedlora.tasks.loop.train_epochs`; ``param_groups``, ``optimizer``)."""
        model.to(self.device)
        return self._train(model, data, TrainSettings.from_config(self.cfg, seed, epochs, lr),
                           **hooks)

    def _train(self, model, data, settings: TrainSettings, **hooks) -> dict[str, float]:
        raise NotImplementedError

    def cap_client(self, idx: np.ndarray, partition_id: int) -> np.ndarray:
        """A client's indices, capped at ``max-examples-per-client`` by a (seed, partition)
        draw, then at what fits the node's ``max-data-mb`` (:func:`fedlora.node.cap_by_memory`)."""
        cap = self.cfg.max_examples_per_client
        if cap and len(idx) > cap:
            rng = np.random.default_rng([self.cfg.seed, partition_id])
            idx = np.sort(rng.choice(idx, cap, replace=False))
        from ..node import cap_by_memory  # the node's own max-data-mb (fedlora/node.py)

        return cap_by_memory(idx, self.example_bytes, partition_id, self.cfg.seed)

    def test_subset(self, n: int) -> np.ndarray | None:
        """``eval-max-examples`` > 0: a fixed random subset of the test split (seed 0, the same
        in every run: files may be sorted by label, so the first N would be few classes)."""
        cap = self.cfg.eval_max_examples
        if cap and cap < n:
            return np.sort(np.random.default_rng(0).permutation(n)[:cap])
        return None

    def fingerprint(self) -> str:
        """Fingerprint of the frozen, seeded base (computed once per process)."""
        if not hasattr(self, "_fingerprint"):
            from ..adapters import fingerprint

            self._fingerprint = fingerprint(self.base())
        return self._fingerprint


@torch.no_grad()
def evaluate_batches(model: nn.Module, n: int, batch_size: int,
                     logits_of: Callable[[nn.Module, torch.Tensor, torch.device], torch.Tensor],
                     y: torch.Tensor) -> dict[str, float]:
    """The evaluation loop of both tasks: accuracy and mean cross-entropy over ``n`` examples in
    order; ``logits_of(model, idx, device)`` gives a batch's float logits."""
    model.eval()
    dev = model_device(model)
    correct, loss_sum = 0, 0.0
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        logits = logits_of(model, idx, dev)
        yb = y[idx].to(dev)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}
