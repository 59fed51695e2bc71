"""Which tensors travel, under which names, and the fingerprint of the frozen base.

* For an adapter model (peft, or :class:`fedlora.lora.LoraNet` with the same names) the travelling state is peft's adapter state dict
  (``get_peft_model_state_dict``: LoRA A/B of every target plus the ``modules_to_save`` layers,
  with their float buffers for BatchNorm) under short names (``base_model.model.`` stripped).
* For a full model (FedAvg baseline) it is every floating tensor of the ``state_dict``.
* The frozen base is never sent: every node rebuilds it from ``model-seed`` and proves it did so
  with :func:`fingerprint`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Mapping

import numpy as np
import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


class BaseMismatchError(RuntimeError):
    """This node's frozen base differs from the server's (different seed, code or torch)."""


def is_adapter_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") or hasattr(model, "adapter_state")


def travelling_state(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Short name → tensor (detached, float32) of everything that travels for this model."""
    if hasattr(model, "adapter_state"):  # fedlora.lora.LoraNet (vision): short names already
        items = model.adapter_state().items()
    elif is_adapter_model(model):
        from peft import get_peft_model_state_dict

        raw = get_peft_model_state_dict(model)
        items = ((k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k, v)
                 for k, v in raw.items())
    else:
        items = model.state_dict().items()
    return OrderedDict((k, v.detach().float()) for k, v in items if v.is_floating_point())


def short_param_name(name: str) -> str:
    """peft parameter name → travelling-state name
    (``base_model.model.x.lora_A.default.weight`` → ``x.lora_A.weight``,
    ``base_model.model.bn1.modules_to_save.default.weight`` → ``bn1.weight``)."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def trainable_params(model: nn.Module) -> "OrderedDict[str, nn.Parameter]":
    """Travelling-state name → the live trainable Parameter (for gradient masks)."""
    return OrderedDict((short_param_name(n), p) for n, p in model.named_parameters()
                       if p.requires_grad)


def state_to_numpy(state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, v.detach().cpu().float().numpy().copy()) for k, v in state.items())


def load_state(model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Copy a travelling state into the model; names and shapes must match exactly."""
    current = travelling_state(model)
    missing = set(current) - set(state)
    extra = set(state) - set(current)
    if missing or extra:
        raise KeyError(f"state does not match the model: missing {sorted(missing)[:5]}, "
                       f"unexpected {sorted(extra)[:5]}")
    tensors = OrderedDict()
    for k, ref in current.items():
        v = torch.as_tensor(np.asarray(state[k]), dtype=torch.float32)
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)} != model's {tuple(ref.shape)}")
        tensors[k] = v
    if hasattr(model, "load_adapter_state"):  # fedlora.lora.LoraNet
        model.load_adapter_state(tensors)
    elif is_adapter_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, {PEFT_PREFIX + k: v for k, v in tensors.items()})
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"peft did not accept {unexpected[:5]}")
    else:
        model.load_state_dict(tensors, strict=False)


def shapes(state: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def fingerprint(base: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) over names, shapes and bytes of the base's state dict."""
    h = hashlib.sha256()
    for name, t in base.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_fingerprint(expected: str, actual: str) -> None:
    if expected != actual:
        raise BaseMismatchError(
            f"frozen base fingerprint mismatch: server has {expected}, this node built {actual}. "
            "Check model-seed, model, feature-maps, norm, lora settings and the torch version.")


def num_params(state: Mapping[str, np.ndarray | torch.Tensor]) -> int:
    return int(sum(int(np.prod(v.shape)) for v in state.values()))


def flocora_analytic_bits(state: Mapping[str, np.ndarray | torch.Tensor], bits: int = 32) -> int:
    """FLoCoRA's message size formula (methods notes §1.6): tensors with dim > 1 cost
    numel·b bits + 64 bits per dim-0 slice (fp32 scale + zero) when quantized (b < 32), 1-D
    tensors cost numel·32. With b = 32 it is the unquantized 32·numel."""
    total = 0
    for v in state.values():
        n = int(np.prod(v.shape))
        if bits >= 32 or len(v.shape) <= 1:
            total += 32 * n
        else:
            total += bits * n + 64 * int(v.shape[0])
    return total


# ------------------------------------------------------------------------------- LoRA pairs


def lora_modules(names) -> "OrderedDict[str, tuple[str, str]]":
    """Module prefix → (A key, B key) for every LoRA pair among travelling-state ``names``."""
    out = OrderedDict()
    for k in names:
        if k.endswith(".lora_A.weight"):
            prefix = k[: -len(".lora_A.weight")]
            b = prefix + ".lora_B.weight"
            if b in names:
                out[prefix] = (k, b)
    return out


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def rank_axis(key: str) -> int:
    """Axis of the rank index: rows of A ([r, in(, k, k)]), columns of B ([out, r(, 1, 1)])."""
    return 0 if ".lora_A." in key else 1


def as_matrices(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A as [r, in·k·k], B as [out, r]) for Linear and Conv2d LoRA factors."""
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1])


def rank_mask(key: str, shape: tuple[int, ...], ranks) -> np.ndarray:
    """Boolean mask selecting rank slices ``ranks`` of factor ``key``."""
    m = np.zeros(shape, dtype=bool)
    idx = [slice(None)] * len(shape)
    idx[rank_axis(key)] = list(ranks)
    m[tuple(idx)] = True
    return m


def truncate_ranks(state: Mapping[str, np.ndarray], rank: int) -> "OrderedDict[str, np.ndarray]":
    """Zero every LoRA rank slice with index ≥ ``rank`` (HetLoRA/FlexLoRA per-client ranks)."""
    out = OrderedDict()
    for k, v in state.items():
        v = np.array(v, dtype=np.float32, copy=True)
        if is_lora_key(k):
            idx = [slice(None)] * v.ndim
            idx[rank_axis(k)] = slice(rank, None)
            v[tuple(idx)] = 0.0
        out[k] = v
    return out
