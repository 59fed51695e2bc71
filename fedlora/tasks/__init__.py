"""What is learned: model + data + train/eval loops (torch lives here)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=2)
def make_task(cfg):
    """The task for a run config, cached per process (data and stats are loaded once)."""
    if cfg.task == "vision":
        from .vision import VisionTask

        return VisionTask(cfg)
    if cfg.task == "text":
        from .text import TextTask

        return TextTask(cfg)
    if cfg.task == "causal-lm":
        from .causal import CausalLMTask

        return CausalLMTask(cfg)
    raise ValueError(f"task must be 'vision', 'text' or 'causal-lm', got {cfg.task!r}")
