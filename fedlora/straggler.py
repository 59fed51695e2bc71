"""Simulated heterogeneity: which partitions are stragglers, and how much slower they train.

``straggler-fraction`` f and ``straggler-slowdown`` S (run config, sync and async alike): the
first round(f·n) partition-ids of a permutation of 0..n−1 drawn from ``seed`` are stragglers; a
straggler's ClientApp measures its local training time t (the task's ``train`` calls:
:class:`TimedTask`) and then sleeps (S − 1)·t, so its training takes S times as long, whatever
the machine's speed (``straggler-sleep=false``: no sleep; time is only the simulated clock,
:func:`sync_round` per round, the async loop's per task). The same partitions are
stragglers in every run with the same seed and number of partitions, on the server (the async
loop's simulated completion order, :func:`task_cost`) and on the nodes. No torch, no Flower.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

def stragglers(seed: int, fraction: float, num_partitions: int) -> frozenset[int]:
    """The straggler partition-ids of a run: round(fraction·n) of them, chosen by ``seed``."""
    n = int(num_partitions)
    k = int(round(float(fraction) * n))
    if k <= 0 or n <= 0:
        return frozenset()
    rng = np.random.default_rng([int(seed), 0x5747])  # its own stream: sampling is untouched
    return frozenset(int(p) for p in rng.permutation(n)[:k])


def slowdown(cfg, partition_id: int, num_partitions: int) -> float:
    """How many times its measured time a partition's local training takes (1: not slowed)."""
    if float(cfg.straggler_fraction) <= 0 or float(cfg.straggler_slowdown) <= 1:
        return 1.0
    if int(partition_id) in stragglers(cfg.seed, cfg.straggler_fraction, num_partitions):
        return float(cfg.straggler_slowdown)
    return 1.0


def task_cost(cfg, partition_id: int, num_partitions: int) -> float:
    """A task's simulated duration (``async-order=simulated``): 1, or a straggler's slowdown."""
    return slowdown(cfg, partition_id, num_partitions)


def records_time(cfg) -> bool:
    """Whether a synchronous run keeps the simulated clock (``simulated_time`` in its records):
    with stragglers, or when the run asks for simulated time only (``straggler-sleep=false``)."""
    return float(cfg.straggler_fraction) > 0 or not bool(cfg.straggler_sleep)


def sync_round(cfg, partition_ids: list[int], num_partitions: int) -> tuple[float, set[int]]:
    """A synchronous round's simulated duration and the indices (into ``partition_ids``, the
    round's train nodes) of the tasks it does not wait for: the round lasts as long as its
    slowest task (:func:`task_cost`, the async loop's unit: a normal node's task = 1), or
    ``simulated-round-timeout`` when a task costs more than that (those tasks time out)."""
    costs = [task_cost(cfg, p, num_partitions) for p in partition_ids]
    limit = float(cfg.simulated_round_timeout)
    late = {i for i, c in enumerate(costs) if limit > 0 and c > limit}
    return (limit if late else max(costs, default=0.0)), late


class TimedTask:
    """A task whose ``train`` calls are timed (everything else passes through): what a
    straggler's local training took, without model building, data loading or imports."""

    def __init__(self, task) -> None:
        self._task = task
        self.train_s = 0.0

    def __getattr__(self, name: str):
        return getattr(self._task, name)

    def train(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._task.train(*args, **kwargs)
        finally:
            self.train_s += time.perf_counter() - t0

    def slow_down(self, factor: float, sleep: Callable[[float], None] = time.sleep) -> float:
        """Sleep (factor − 1) × the training time measured so far; returns the seconds slept."""
        extra = max(float(factor) - 1.0, 0.0) * self.train_s
        if extra > 0:
            sleep(extra)
        return extra
