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
    raise ValueError(f"task must be 'vision' or 'text', got {cfg.task!r}")
