"""LoRA for the vision task's conv nets in plain torch, so that a vision node needs neither peft nor
transformers (peft imports transformers at import time: about 9 s and a few hundred MB of an edge
node's memory for a model that uses none of it).

It builds the same model peft 0.21 builds for FLoCoRA's mode 2 (``LoraConfig(r, lora_alpha,
lora_dropout=0, bias="none", target_modules=<every Conv2d>, modules_to_save=<every norm + fc>)``):
the same parameter names (so every travelling-state name, checkpoint and record is unchanged),
the same initialisation drawing the same torch random numbers in the same order, the same
forward (``base(x) + B(A(x)) · alpha/r``), travelling state and merge arithmetic.
``tests/test_lazy_imports.py`` compares it with peft tensor for tensor; the details:
docs/edge.md ("Plain-torch LoRA for vision nodes").
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

ADAPTER = "default"
PREFIX = "base_model.model."


class LoraConv2d(nn.Module):
    """A frozen ``base_layer`` plus a rank-``r`` conv pair: ``lora_B(lora_A(x)) · scaling``."""

    def __init__(self, base: nn.Conv2d, r: int, alpha: float) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.base_layer = base
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Conv2d(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Conv2d(
            r, base.out_channels, (1, 1), (1, 1), groups=base.groups, bias=False)})
        self.scaling = {ADAPTER: alpha / r}
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[ADAPTER].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out + self.lora_B[ADAPTER](self.lora_A[ADAPTER](x)) * self.scaling[ADAPTER]

    def delta_weight(self) -> torch.Tensor:
        """``B·A·scaling`` as a conv kernel of the base's shape."""
        a, b = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
        if tuple(self.base_layer.weight.shape[2:4]) == (1, 1):
            return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)
                    ).unsqueeze(2).unsqueeze(3) * self.scaling[ADAPTER]
        return F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * self.scaling[ADAPTER]

    def merged(self) -> nn.Conv2d:
        base = self.base_layer
        base.weight.data += self.delta_weight()
        return base


class SavedModule(nn.Module):
    """A frozen ``original_module`` and the trainable copy that is used and travels."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({ADAPTER: copy.deepcopy(module)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modules_to_save[ADAPTER](x)


class _Inner(nn.Module):
    """Holds the wrapped network as ``.model`` (peft's ``LoraModel`` place in the names)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LoraNet(nn.Module):
    """A network with LoRA on ``targets`` (Conv2d names) and trainable copies of ``saved``."""

    def __init__(self, model: nn.Module, r: int, alpha: float, targets, saved) -> None:
        super().__init__()
        settings = (int(r), float(alpha), list(targets), list(saved))  # for save_pretrained
        targets, saved = set(targets), set(saved)
        for name, module in list(model.named_modules()):
            if name in targets:
                if not isinstance(module, nn.Conv2d):
                    raise TypeError(f"LoRA target {name!r} is a {type(module).__name__}, "
                                    "not a Conv2d")
                _replace(model, name, LoraConv2d(module, int(r), float(alpha)))
        for name in [n for n, _ in model.named_modules() if n in saved]:
            _replace(model, name, SavedModule(model.get_submodule(name)))
        missing = (targets | saved) - {n for n, m in model.named_modules()
                                       if isinstance(m, (LoraConv2d, SavedModule))}
        if missing:
            raise KeyError(f"no module named {sorted(missing)[:5]} in the model")
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n or ".modules_to_save." in n)
        self.base_model = _Inner(model)
        self.lora_settings = settings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_model(x)

    def adapter_state(self) -> "OrderedDict[str, torch.Tensor]":
        """What travels, short names: every LoRA factor, then each saved module's tensors."""
        model = self.base_model.model
        out = OrderedDict()
        for k, v in model.state_dict().items():
            if "lora_" in k:
                out[k.replace(f".{ADAPTER}.", ".")] = v
        for name, m in model.named_modules():
            if isinstance(m, SavedModule):
                for k, v in m.modules_to_save[ADAPTER].state_dict().items():
                    out[f"{name}.{k}"] = v
        return out

    def load_adapter_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors named as in :meth:`adapter_state` into the live modules."""
        model = self.base_model.model
        targets = {}
        for k in tensors:
            mod, _, leaf = k.rpartition(".")
            if ".lora_A." in k or ".lora_B." in k:
                head, _, factor = mod.rpartition(".")
                targets[k] = (model.get_submodule(head), factor, leaf)
            else:
                owner = model.get_submodule(mod)
                if not isinstance(owner, SavedModule):
                    raise KeyError(f"{k}: not a LoRA factor or a saved module's tensor")
                targets[k] = (owner, "modules_to_save", leaf)
        with torch.no_grad():
            for k, (owner, attr, leaf) in targets.items():
                getattr(getattr(owner, attr)[ADAPTER], leaf).copy_(tensors[k])

    def save_pretrained(self, path: str) -> None:
        """peft's adapter folder (``adapter_config.json``, ``adapter_model.safetensors``), as
        ``PeftModel.save_pretrained`` writes it: the only place peft is imported (the server's
        end of a run)."""
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        r, alpha, targets, saved = self.lora_settings
        net = copy.deepcopy(self.base_model.model)
        for name, m in list(net.named_modules()):  # back to the plain network
            if isinstance(m, LoraConv2d):
                _replace(net, name, m.base_layer)
            elif isinstance(m, SavedModule):
                _replace(net, name, m.original_module)
        peft_model = get_peft_model(net, LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets,
            modules_to_save=saved))
        state = self.adapter_state()
        set_peft_model_state_dict(peft_model, {PREFIX + k: v for k, v in state.items()})
        peft_model.save_pretrained(path)

    def merge_and_unload(self) -> nn.Module:
        """The plain network with ``B·A·scaling`` added to each base conv (this model is used up)."""
        model = self.base_model.model
        for name, m in list(model.named_modules()):
            if isinstance(m, LoraConv2d):
                _replace(model, name, m.merged())
            elif isinstance(m, SavedModule):
                _replace(model, name, m.modules_to_save[ADAPTER])
        return model


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
