"""One file per method: its Strategy (server half) and its ``client_train`` (client half); the
round machinery they share lives in :mod:`fedlora.strategies`. ``averaging`` holds the
weight-averaging family's shared halves (FedAvg, FLoCoRA, FL+LoRA, FFA-LoRA)."""

from __future__ import annotations

import importlib
from types import ModuleType

METHODS = {
    "fedavg": "fedavg",
    "flocora": "flocora",
    "flasc": "flasc",
    "lora-a2": "lora_a2",
    "fl-lora": "fl_lora",
    "ffa-lora": "ffa_lora",
    "flexlora": "flexlora",
    "hetlora": "hetlora",
}


def get_method(name: str) -> ModuleType:
    """The module implementing ``name`` (exposes ``Strategy`` and ``client_train``)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return importlib.import_module(f"{__name__}.{METHODS[name]}")
