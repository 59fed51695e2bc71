"""The vision task (FLoCoRA's setting): CIFAR-style ResNet-8/18, LoRA on every conv, image data.

Everything torch lives here (and in ``text.py``); strategies call into these functions and never
run a training loop themselves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .loop import make_optimizer, model_device, train_epochs
from .task import TaskBase, TrainSettings, evaluate_batches

# (blocks, stride, width multiplier) per stage, as in FLoCoRA's models/resnets.py
ARCHS: dict[str, list[tuple[int, int, int]]] = {
    "resnet8": [(1, 1, 1), (1, 2, 2), (1, 2, 4)],
    "resnet18": [(2, 1, 1), (2, 2, 2), (2, 2, 4), (2, 2, 8)],
}


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(2, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), make_norm(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self, arch: str, num_classes: int = 10, in_channels: int = 3,
        feature_maps: int = 64, norm: str = "group",
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"model must be one of {sorted(ARCHS)}, got {arch!r}")
        self.conv1 = nn.Conv2d(in_channels, feature_maps, 3, 1, 1, bias=False)
        self.bn1 = make_norm(norm, feature_maps)
        layers, cin = [], feature_maps
        for blocks, stride, mult in ARCHS[arch]:
            cout = feature_maps * mult
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(cin, cout, stride if b == 0 else 1, norm))
                cin = cout
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@dataclass(frozen=True)
class VisionModelConfig:
    arch: str = "resnet8"
    num_classes: int = 10
    in_channels: int = 3
    feature_maps: int = 64
    norm: str = "group"
    lora_rank: int = 32
    lora_alpha: float = 0.0  # 0 = 16 * rank (FLoCoRA's scaling alpha/r = 16)
    seed: int = 0

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha > 0 else 16.0 * self.lora_rank


def build_base(cfg: VisionModelConfig) -> nn.Module:
    """The frozen random base, identical on every node: built under ``cfg.seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ResNet(cfg.arch, cfg.num_classes, cfg.in_channels, cfg.feature_maps, cfg.norm)


def lora_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(every Conv2d name, every norm + fc name): FLoCoRA's mode 2."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    full = [n for n, m in model.named_modules()
            if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))] + ["fc"]
    return convs, full


def build_model(cfg: VisionModelConfig, adapter: bool) -> nn.Module:
    """The seeded base, wrapped with LoRA (mode 2) when ``adapter``; fully trainable otherwise.
    The wrapper is :class:`fedlora.lora.LoraNet` (plain torch, the model peft builds for the same
    ``LoraConfig``, without importing peft/transformers on a vision node)."""
    model = build_base(cfg)
    if not adapter:
        return model
    from ..lora import LoraNet

    convs, full = lora_targets(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        return LoraNet(model, cfg.lora_rank, cfg.alpha, convs, full)


def build_peft_model(cfg: VisionModelConfig) -> nn.Module:
    """The same adapter model built by peft (the reference :func:`build_model` is tested
    against; needs peft, hence transformers)."""
    from peft import LoraConfig, get_peft_model

    model = build_base(cfg)
    convs, full = lora_targets(model)
    lcfg = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none",
        target_modules=convs, modules_to_save=full,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        return get_peft_model(model, lcfg)


# ---------------------------------------------------------------------------------------------
# data → tensors, augmentation, train / evaluate loops


def to_tensor(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,C) → normalized float (N,C,H,W)."""
    t = torch.from_numpy(np.array(x, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (t - m) / s


def augment(batch: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) + horizontal flip, per sample."""
    n, _, h, w = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(batch)
    for i in range(n):
        crop = padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def sgd_train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, st: TrainSettings,
    grad_hook=None, step_hook=None, param_groups=None, optimizer: str = "sgd",
) -> dict[str, float]:
    """Local training (see :func:`fedlora.tasks.loop.train_epochs` for the hooks)."""
    params = param_groups or [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, st.lr, st.weight_decay, st.momentum, st.nesterov)

    dev = model_device(model)

    def batch_loss(idx, gen):
        xb = augment(x[idx], gen) if st.augment else x[idx]  # on the CPU: same draws anywhere
        return F.cross_entropy(model(xb.to(dev, non_blocking=True)), y[idx].to(dev))

    return train_epochs(model, len(y), st.epochs, st.batch_size, st.seed, batch_loss, opt,
                        grad_hook, step_hook)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64
             ) -> dict[str, float]:
    """Accuracy and mean loss of ``model`` on images ``x`` (the shared evaluation loop)."""
    return evaluate_batches(model, len(y), batch_size,
                            lambda m, idx, dev: m(x[idx].to(dev, non_blocking=True)), y)


class VisionTask(TaskBase):
    """Model + data + loops for one run config (built once per process and cached)."""

    kind = "vision"

    def __init__(self, cfg) -> None:
        from .data import load_images

        super().__init__(cfg)
        test = load_images(cfg.dataset, cfg.data_dir, "test")
        # a test subset may miss the top labels: known datasets have a fixed class count
        known = {"cifar10": 10, "fashion-mnist": 10}
        self.num_classes = max(test.num_classes, known.get(cfg.dataset, 0))
        self.channels = test.channels
        self.example_bytes = 4 * int(np.prod(test.x.shape[1:]))  # float32 C·H·W
        self.model_cfg = VisionModelConfig(
            arch=cfg.model, num_classes=self.num_classes, in_channels=self.channels,
            feature_maps=cfg.feature_maps, norm=cfg.norm, lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha, seed=cfg.model_seed)
        self._test = test

    # --- model -----------------------------------------------------------------------------
    def new_model(self, adapter: bool) -> nn.Module:
        return build_model(self.model_cfg, adapter)

    def base(self) -> nn.Module:
        return build_base(self.model_cfg)

    # --- data ------------------------------------------------------------------------------
    def _norm_stats(self):
        """Standard per-channel constants for known datasets, else the test split's stats."""
        known = {"fashion-mnist": ([0.2860], [0.3530]),
                 "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])}
        if self.cfg.dataset in known:
            return tuple(np.asarray(v, np.float32) for v in known[self.cfg.dataset])
        return self._test.stats()

    def client_data(self, partition_id: int, num_partitions: int, data_dir: str = ""
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        from .data import load_images, partition_indices

        train = load_images(self.cfg.dataset, data_dir or self.cfg.data_dir, "train")
        idx = partition_indices(train.y, num_partitions, partition_id, self.cfg.partitioner,
                                self.cfg.dirichlet_alpha, self.cfg.seed,
                                self.cfg.classes_per_partition,
                                self.cfg.min_partition_size)
        idx = self.cap_client(idx, partition_id)
        mean, std = self._norm_stats()
        return to_tensor(train.x[idx], mean, std), torch.from_numpy(train.y[idx])

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The test split, or its fixed subset (``eval-max-examples``)."""
        t = self._test
        mean, std = self._norm_stats()
        idx = self.test_subset(len(t.y))
        if idx is not None:
            return to_tensor(t.x[idx], mean, std), torch.from_numpy(t.y[idx])
        return to_tensor(t.x, mean, std), torch.from_numpy(t.y)

    # --- loops -----------------------------------------------------------------------------
    def _train(self, model: nn.Module, data, settings: TrainSettings, **hooks
               ) -> dict[str, float]:
        x, y = data
        return sgd_train(model, x, y, settings, **hooks)

    def evaluate(self, model: nn.Module, data) -> dict[str, float]:
        """Accuracy/loss; an adapter model is evaluated merged into a copy of its base
        (numerically the same function, about 3x faster on CPU than the unmerged LoRA convs)."""
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        return evaluate(model.to(self.device), *data)
