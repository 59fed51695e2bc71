"""Runtime support for the element-wise passes: a small worker pool (:func:`run_parallel`) and the
per-thread scratch arena of one encode (:func:`scratch`, :func:`scratch_arrays`,
:func:`scratch_scope`). Nothing here touches the wire format."""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["run_parallel", "scratch", "scratch_arrays", "scratch_scope"]

# --------------------------------------------------------------------------------------------
# a small worker pool for the element-wise passes (numpy releases the GIL inside its loops)

_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def run_parallel(fn, n: int, min_per_part: int = 1 << 18) -> list:
    """``[fn(lo, hi), ...]`` over a split of ``range(n)`` into contiguous parts (results in order).

    The calling thread and the pool's threads pull parts from a shared counter, so a thread that
    loses its core to another process does not hold the others up. Serial when ``n`` is small or
    there is one CPU."""
    workers = _workers()
    parts = min(4 * workers, max(1, n // max(1, min_per_part)))
    if workers <= 1 or parts <= 1:
        return [fn(0, n)]
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():  # (re)create after a fork
            _POOL = (os.getpid(), ThreadPoolExecutor(workers - 1,
                                                     thread_name_prefix="fedlora-codec"))
        pool = _POOL[1]
    bounds = [n * i // parts for i in range(parts + 1)]
    results: list = [None] * parts
    ticket = itertools.count()  # next() is atomic under the GIL

    def worker() -> None:
        while (i := next(ticket)) < parts:
            results[i] = fn(bounds[i], bounds[i + 1])

    futs = [pool.submit(worker) for _ in range(min(workers, parts) - 1)]
    try:
        worker()
    finally:
        for f in futs:
            f.result()
    return results


# --------------------------------------------------------------------------------------------
# scratch memory for one encode: fresh multi-MB buffers are expensive (the kernel zero-fills
# every page on first touch, ~0.7 ms per MB of 4 KiB pages measured on these VMs), so the
# intermediate buffers of an encode (e.g. affine's quantized bytes) come from a per-thread block
# that is reused by the next encode. Only the returned payload is a fresh allocation.

_ARENA_KEEP = 1 << 26  # never keep more than 64 MiB of scratch per thread


class _Arena(threading.local):
    def __init__(self) -> None:
        self.block = np.empty(0, np.uint8)
        self.pos = 0
        self.overflow = 0
        self.depth = 0

    def take(self, n: int) -> np.ndarray:
        if self.depth == 0:
            return np.empty(n, np.uint8)
        need = (n + 63) & ~63  # keep every piece 64-byte aligned
        if self.pos + need <= self.block.size:
            view = self.block[self.pos:self.pos + n]
            self.pos += need
            return view
        self.overflow += need
        return np.empty(n, np.uint8)

    def __enter__(self) -> "_Arena":
        self.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        if self.depth:
            return
        want = self.pos + self.overflow
        if self.overflow and want <= _ARENA_KEEP:  # the next encode of this size fits
            self.block = np.empty(want, np.uint8)
        self.pos = self.overflow = 0


_ARENA = _Arena()


def scratch(n: int) -> np.ndarray:
    """An uninitialised ``uint8[n]`` that stays valid until the enclosing ``Pipeline.encode``
    returns (a fresh array outside an encode). Never return it, or a view of it, to a caller."""
    return _ARENA.take(n)


def scratch_arrays(n: int, *dtypes) -> list[np.ndarray]:
    """One :func:`scratch` block cut into ``n``-element arrays of ``dtypes`` (each 8-byte
    aligned when the dtypes are given widest first); same lifetime rules as :func:`scratch`."""
    sizes = [n * np.dtype(dt).itemsize for dt in dtypes]
    raw = scratch(sum(sizes))
    out, pos = [], 0
    for dt, size in zip(dtypes, sizes):
        out.append(raw[pos:pos + size].view(dt))
        pos += size
    return out


def scratch_scope() -> _Arena:
    """The re-entrant context of one encode: :func:`scratch` memory taken inside it stays valid
    until the outermost scope exits, and is then reused by the next encode on this thread."""
    return _ARENA
