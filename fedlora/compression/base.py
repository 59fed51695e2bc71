"""Codec core: errors, stage registry, spec parser, payload header and the :class:`Pipeline`.

A pipeline is a chain of stages written as a spec string, stages separated by ``|``, each
``id[:arg[:arg]]``::

    [sparsifier] [value coder] [lossless byte stage ...]
    sparsifier   topk:d | topk:d:tensor | ranks            (at most one, first)
    value coder  fp32 (default) | fp16 | bf16 | affine:b   (at most one)
    lossless     zstd | zstd:level                         (any number, last)

Canonical spec (``Pipeline.spec``): stages in that order, whitespace removed, numbers normalised
(``topk:5e-2`` -> ``topk:0.05``, ``zstd:3`` -> ``zstd``), and the default ``fp32`` value coder left
out unless it is the only stage (``"fp32|zstd"`` -> ``"zstd"``; ``"fp32"`` stays ``"fp32"``).

Payload layout (version 1; all integers are unsigned LEB128 varints unless stated; floats and
fixed-width integers are little-endian)::

    magic        3 bytes  b"FLC"
    version      1 byte   1
    spec         varint length + UTF-8 canonical spec (names every stage and its arguments)
    n_tensors    varint
    n_tensors x  name (varint length + UTF-8), ndim (varint), ndim dims (varints)
    body         the raw body, or, per lossless stage (outermost last in the spec, first here):
                 varint raw length + compressed bytes of the next inner layer
    raw body     for each tensor, in header order: [sparsifier section][value section]

The header is never compressed, so a receiver validates names, shapes, ``expected`` and
``max_elements`` before touching (or decompressing) the body. Every count in the body is implied by
the header shapes plus the section's own small fields, so the body is self-delimiting and any
trailing byte is an error. The per-tensor sections (codec parameters: index coding, kept ranks,
scales/zero-points) are documented in each codec's module: ``sparsify.py``, ``ranks.py``,
``quantize.py``, ``casts.py``, ``lossless.py``. With no sparsifier, a tensor's raw section is just
its value section.

Decoding is hardened for untrusted input: any malformed payload raises :class:`CodecError`, sizes
are checked against ``max_elements`` and against the bytes actually present before anything is
allocated, and decoded values are guaranteed finite float32. Header limits: spec <= 256 bytes,
<= 65536 tensors, ndim <= 32, every dim and the total element count <= ``max_elements``; a
lossless layer's declared raw length must not exceed the largest raw body the header shapes allow.

Adding a codec: one module with a :class:`Codec` subclass (``Sparsifier``, ``ValueCoder`` or
``LosslessCodec``) decorated with :func:`register`, imported by ``fedlora/compression/__init__.py``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np

try:  # torch is optional: used for its fused multi-threaded kernels and to accept torch tensors
    import torch as _torch
except ImportError:  # pragma: no cover - exercised only without torch
    _torch = None

__all__ = [
    "CodecError", "SpecError", "Codec", "Sparsifier", "ValueCoder", "LosslessCodec", "Pipeline",
    "register", "registered_ids", "parse_spec", "decode_payload", "read_header", "run_parallel",
    "MAGIC", "FORMAT_VERSION", "DEFAULT_MAX_ELEMENTS", "scratch", "scratch_arrays",
]

MAGIC = b"FLC"
FORMAT_VERSION = 1
DEFAULT_MAX_ELEMENTS = 2 ** 28
MAX_NDIM = 32
MAX_TENSORS = 1 << 16
MAX_SPEC_BYTES = 256
FLT_MAX = float(np.finfo(np.float32).max)


class CodecError(ValueError):
    """A payload (or an input to encode) is malformed or unsupported; the message says what."""


class SpecError(ValueError):
    """A codec spec string (or config) is invalid; the message names the bad part."""


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


# --------------------------------------------------------------------------------------------
# varints and a bounds-checked reader


def uvarint(n: int) -> bytes:
    """Unsigned LEB128 encoding of ``n >= 0``."""
    if n < 0:
        raise ValueError("uvarint of a negative number")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def uvarint_len(n: int) -> int:
    """Length in bytes of :func:`uvarint` ``(n)``."""
    return max(1, (int(n).bit_length() + 6) // 7)


class Reader:
    """Sequential reader over a bytes-like object; every read is bounds-checked (CodecError)."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf, what: str = "payload"):
        self.buf = memoryview(buf).cast("B")
        self.pos = 0
        self.end = len(self.buf)

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.end - self.pos:
            raise CodecError(f"truncated payload: {what} needs {n} bytes, "
                             f"{self.end - self.pos} left")
        mv = self.buf[self.pos:self.pos + n]
        self.pos += n
        return mv

    def u8(self, what: str) -> int:
        if self.pos >= self.end:
            raise CodecError(f"truncated payload: missing {what}")
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def uvarint(self, what: str, limit: int | None = None) -> int:
        """Read a canonical varint (at most 10 bytes, no redundant zero bytes), ``<= limit``."""
        v = 0
        shift = 0
        start = self.pos
        while True:
            if self.pos >= self.end:
                raise CodecError(f"truncated payload: varint {what}")
            b = self.buf[self.pos]
            self.pos += 1
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift >= 70:
                raise CodecError(f"varint {what} is too long")
        if self.pos - start > 1 and b == 0:
            raise CodecError(f"varint {what} is not canonical (redundant zero byte)")
        if limit is not None and v > limit:
            raise CodecError(f"{what} = {v} exceeds the limit {limit}")
        return v

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        """A read-only little-endian array view of ``count`` items (bounds-checked)."""
        dt = np.dtype(dtype)
        mv = self.take(count * dt.itemsize, what)
        return np.frombuffer(mv, dtype=dt, count=count)

    def done(self, what: str = "payload") -> None:
        if self.pos != self.end:
            raise CodecError(f"{self.end - self.pos} trailing byte(s) after the {what}")


# --------------------------------------------------------------------------------------------
# codec stages and registry

_REGISTRY: dict[str, type["Codec"]] = {}


def register(cls: type["Codec"]) -> type["Codec"]:
    """Class decorator: make a codec available to the spec parser under ``cls.codec_id``."""
    cid = cls.codec_id
    if not re.fullmatch(r"[a-z][a-z0-9_]*", cid or ""):
        raise ValueError(f"bad codec id {cid!r}")
    if cid in _REGISTRY and _REGISTRY[cid] is not cls:
        raise ValueError(f"codec id {cid!r} is already registered")
    _REGISTRY[cid] = cls
    return cls


def registered_ids() -> list[str]:
    return sorted(_REGISTRY)


class Codec:
    """One pipeline stage. Subclasses set ``codec_id`` and ``kind`` and implement the hooks."""

    codec_id: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "sparsifier" | "value" | "lossless"

    @classmethod
    def from_args(cls, args: list[str]) -> "Codec":
        """Build from the ``:``-separated spec arguments; raise SpecError (message: the problem)."""
        if args:
            raise SpecError(f"{cls.codec_id} takes no arguments")
        return cls()

    def spec_part(self) -> str:
        """Canonical ``id[:arg...]`` of this stage."""
        return self.codec_id

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Codec":
        extra = set(cfg) - {"id"}
        if extra:
            raise SpecError(f"{cls.codec_id}: unknown config keys {sorted(extra)}")
        return cls()

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.spec_part() == other.spec_part()

    def __hash__(self) -> int:
        return hash(self.spec_part())

    def __repr__(self) -> str:
        return f"<codec {self.spec_part()}>"


class ValueCoder(Codec):
    """Codes a float32 array of known shape. ``groups`` is the slice layout hint: ``g > 0``
    means the array is ``g`` equal contiguous slices (per-slice parameters, e.g. affine scales);
    ``0`` means "no slicing" (affine then stores raw float32, as for 1-D tensors)."""

    kind = "value"

    def encode_values(self, x: np.ndarray, groups: int, out: list) -> None:
        raise NotImplementedError

    def values_size(self, x: np.ndarray, groups: int) -> int:
        raise NotImplementedError

    def max_values_size(self, n: int, groups: int) -> int:
        raise NotImplementedError

    def decode_values(self, r: Reader, shape: tuple[int, ...], groups: int,
                      name: str) -> np.ndarray:
        raise NotImplementedError


class Sparsifier(Codec):
    """Chooses what travels; delegates the kept values to the value coder.

    ``encode_all`` appends, per tensor in order, the sparsifier section then the value section.
    ``decode_all`` reads them back and returns dense float32 arrays (zero-filled)."""

    kind = "sparsifier"

    def encode_all(self, items: list[tuple[str, np.ndarray]], vc: ValueCoder, out: list) -> None:
        raise NotImplementedError

    def size_all(self, items: list[tuple[str, np.ndarray]], vc: ValueCoder) -> int:
        raise NotImplementedError

    def max_size(self, name: str, shape: tuple[int, ...], vc: ValueCoder) -> int:
        raise NotImplementedError

    def decode_all(self, r: Reader, table: list[tuple[str, tuple[int, ...]]],
                   vc: ValueCoder) -> dict[str, np.ndarray]:
        raise NotImplementedError


class LosslessCodec(Codec):
    """A lossless transform of the whole raw body."""

    kind = "lossless"

    def encode_bytes(self, data: bytes) -> bytes:
        raise NotImplementedError

    def decode_bytes(self, data: memoryview, raw_len: int) -> bytes:
        """Decode to exactly ``raw_len`` bytes (already checked against a bound) or CodecError."""
        raise NotImplementedError

    def max_encoded_size(self, raw_len: int) -> int:
        raise NotImplementedError


def slice_groups(shape: tuple[int, ...]) -> int:
    """Per-dim-0-slice grouping of a dense tensor: ``shape[0]`` for ndim >= 2, else 0."""
    if len(shape) >= 2 and math.prod(shape) > 0:
        return shape[0]
    return 0


class Dense(Sparsifier):
    """The implicit no-sparsifier stage: every tensor is one value section (not in the registry)."""

    codec_id = "dense"

    def encode_all(self, items, vc, out):
        for _, x in items:
            vc.encode_values(x, slice_groups(x.shape), out)

    def size_all(self, items, vc):
        return sum(vc.values_size(x, slice_groups(x.shape)) for _, x in items)

    def max_size(self, name, shape, vc):
        return vc.max_values_size(math.prod(shape), slice_groups(shape))

    def decode_all(self, r, table, vc):
        return {name: vc.decode_values(r, shape, slice_groups(shape), name)
                for name, shape in table}


# --------------------------------------------------------------------------------------------
# spec parsing


def _stage_from_text(part: str, spec: str) -> Codec:
    text = part.strip()
    if not text:
        raise SpecError(f"empty stage in spec {spec!r}")
    pieces = [p.strip() for p in text.split(":")]
    cid = pieces[0].lower()
    cls = _REGISTRY.get(cid)
    if cls is None:
        raise SpecError(f"unknown codec {cid!r} in spec {spec!r} "
                        f"(known: {', '.join(registered_ids())})")
    try:
        return cls.from_args(pieces[1:])
    except SpecError as err:
        raise SpecError(f"bad stage {text!r} in spec {spec!r}: {err}") from None


def _check_order(stages: Sequence[Codec], spec: str) -> None:
    rank = {"sparsifier": 0, "value": 1, "lossless": 2}
    seen = {"sparsifier": 0, "value": 0}
    last = -1
    for st in stages:
        if st.kind not in rank:
            raise SpecError(f"stage {st.spec_part()!r} has unknown kind {st.kind!r}")
        k = rank[st.kind]
        if k < last:
            raise SpecError(f"stage {st.spec_part()!r} is out of order in spec {spec!r} "
                            "(sparsifier first, then value coder, then lossless stages)")
        last = k
        if st.kind in seen:
            seen[st.kind] += 1
            if seen[st.kind] > 1:
                raise SpecError(f"more than one {st.kind} in spec {spec!r} "
                                f"(second: {st.spec_part()!r})")


def parse_spec(spec: str) -> "Pipeline":
    """Parse ``"topk:0.05|affine:4|zstd"`` into a :class:`Pipeline`; SpecError on a bad spec."""
    if isinstance(spec, Pipeline):
        return spec
    if not isinstance(spec, str):
        raise SpecError(f"spec must be a string, got {type(spec).__name__}")
    if not spec.strip():
        raise SpecError("empty codec spec")
    stages = [_stage_from_text(p, spec) for p in spec.split("|")]
    return Pipeline(stages, _spec_text=spec)


# --------------------------------------------------------------------------------------------
# tensors in


def _to_float32(name, t) -> np.ndarray:
    if not isinstance(name, str):
        raise CodecError(f"tensor names must be str, got {type(name).__name__}")
    if _torch is not None and isinstance(t, _torch.Tensor):
        if not t.is_floating_point():
            raise CodecError(f"tensor {name!r}: dtype {t.dtype} is not a float dtype")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        arr = t.to(_torch.float32).contiguous().numpy()
    else:
        arr = np.asarray(t)
        if arr.dtype.kind != "f":
            raise CodecError(f"tensor {name!r}: dtype {arr.dtype} is not a float dtype")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not arr.dtype.isnative:  # pragma: no cover - big-endian inputs
        arr = arr.astype("<f4")
    return arr


def as_bytes(a: np.ndarray):
    """Zero-copy bytes-like view of a contiguous array (``b""`` when empty)."""
    if a.size == 0:
        return b""
    return memoryview(np.ascontiguousarray(a).reshape(-1)).cast("B")


def check_finite(x: np.ndarray, name: str) -> None:
    """CodecError unless every value of float32 ``x`` is finite (two SIMD reductions, no temp)."""
    if x.size and not (math.isfinite(float(x.min())) and math.isfinite(float(x.max()))):
        raise CodecError(f"tensor {name!r} contains NaN or Inf")


# --------------------------------------------------------------------------------------------
# header


def _encode_header(spec: str, table: list[tuple[str, tuple[int, ...]]]) -> bytes:
    sb = spec.encode("utf-8")
    parts = [MAGIC, bytes([FORMAT_VERSION]), uvarint(len(sb)), sb, uvarint(len(table))]
    for name, shape in table:
        nb = name.encode("utf-8")
        parts += [uvarint(len(nb)), nb, uvarint(len(shape))]
        parts += [uvarint(d) for d in shape]
    return b"".join(parts)


def _header_size(spec: str, table) -> int:
    sb = len(spec.encode("utf-8"))
    n = len(MAGIC) + 1 + uvarint_len(sb) + sb + uvarint_len(len(table))
    for name, shape in table:
        nb = len(name.encode("utf-8"))
        n += uvarint_len(nb) + nb + uvarint_len(len(shape)) + sum(uvarint_len(d) for d in shape)
    return n


def read_header(payload, max_elements: int = DEFAULT_MAX_ELEMENTS):
    """Parse and validate the header. Returns ``(pipeline, table, reader)``, the reader positioned
    at the body; ``table`` is a list of ``(name, shape)``. CodecError on any problem."""
    if isinstance(payload, str):
        raise CodecError("payload must be bytes, got str")
    try:
        r = Reader(payload)
    except (TypeError, ValueError):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}") from None
    if r.remaining < len(MAGIC) + 1:
        raise CodecError(f"payload of {r.remaining} bytes is too short for a header")
    if bytes(r.take(len(MAGIC), "magic")) != MAGIC:
        raise CodecError("bad magic bytes: not a fedlora codec payload")
    ver = r.u8("version")
    if ver != FORMAT_VERSION:
        raise CodecError(f"unsupported payload format version {ver} (this decoder reads "
                         f"{FORMAT_VERSION})")
    slen = r.uvarint("spec length", MAX_SPEC_BYTES)
    try:
        spec = bytes(r.take(slen, "spec")).decode("utf-8")
        pipe = parse_spec(spec)
    except (UnicodeDecodeError, SpecError) as err:
        raise CodecError(f"payload header names a bad codec spec: {err}") from None
    if pipe.spec != spec:
        raise CodecError(f"payload spec {spec!r} is not canonical (expected {pipe.spec!r})")
    n = r.uvarint("tensor count", min(MAX_TENSORS, r.remaining))
    table: list[tuple[str, tuple[int, ...]]] = []
    names: set[str] = set()
    total = 0
    for i in range(n):
        nlen = r.uvarint(f"name length of tensor #{i}", r.remaining)
        try:
            name = bytes(r.take(nlen, f"name of tensor #{i}")).decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"name of tensor #{i} is not valid UTF-8") from None
        if name in names:
            raise CodecError(f"duplicate tensor name {name!r}")
        names.add(name)
        ndim = r.uvarint(f"ndim of tensor {name!r}", MAX_NDIM)
        shape = tuple(r.uvarint(f"dim {j} of tensor {name!r}", max_elements)
                      for j in range(ndim))
        numel = math.prod(shape)
        total += numel
        if total > max_elements:
            raise CodecError(f"tensor {name!r} {shape} brings the declared total to {total} "
                             f"elements, over max_elements={max_elements}")
        table.append((name, shape))
    return pipe, table, r


def _check_expected(table, expected: Mapping[str, Sequence[int]] | None) -> None:
    if expected is None:
        return
    got = dict(table)
    for name, shape in expected.items():
        if name not in got:
            raise CodecError(f"tensor {name!r} is missing from the payload")
        want = tuple(int(d) for d in shape)
        if got[name] != want:
            raise CodecError(f"tensor {name!r} has shape {got[name]}, expected {want}")
    for name, _ in table:
        if name not in expected:
            raise CodecError(f"unexpected tensor {name!r} in the payload")


# --------------------------------------------------------------------------------------------
# the pipeline


class Pipeline:
    """A parsed codec chain: ``encode`` tensors to a self-describing payload, ``decode`` it back."""

    def __init__(self, stages: Sequence[Codec], _spec_text: str | None = None):
        stages = list(stages)
        for st in stages:
            if not isinstance(st, Codec):
                raise SpecError(f"pipeline stages must be codecs, got {type(st).__name__}")
        text = _spec_text if _spec_text is not None else "|".join(s.spec_part() for s in stages)
        _check_order(stages, text)
        self.sparsifier: Sparsifier | None = next(
            (s for s in stages if s.kind == "sparsifier"), None)
        vcs = [s for s in stages if s.kind == "value"]
        if vcs:
            self.value_coder: ValueCoder = vcs[0]
        else:
            self.value_coder = _REGISTRY["fp32"]()
        self.lossless: list[LosslessCodec] = [s for s in stages if s.kind == "lossless"]
        parts = []
        if self.sparsifier is not None:
            parts.append(self.sparsifier.spec_part())
        if self.value_coder.codec_id != "fp32" or (self.sparsifier is None and not self.lossless):
            parts.append(self.value_coder.spec_part())
        parts += [s.spec_part() for s in self.lossless]
        self.spec: str = "|".join(parts)
        if len(self.spec.encode("utf-8")) > MAX_SPEC_BYTES:
            raise SpecError(f"spec {self.spec!r} is too long")

    # -- identity -------------------------------------------------------------------------
    @property
    def stages(self) -> list[Codec]:
        out: list[Codec] = [self.sparsifier] if self.sparsifier is not None else []
        return out + [self.value_coder] + list(self.lossless)

    def __eq__(self, other) -> bool:
        return isinstance(other, Pipeline) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return f"Pipeline({self.spec!r})"

    def get_config(self) -> dict[str, Any]:
        return {"id": "pipeline", "spec": self.spec,
                "stages": [s.get_config() for s in self.stages]}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Pipeline":
        if not isinstance(cfg, Mapping):
            raise SpecError(f"pipeline config must be a mapping, got {type(cfg).__name__}")
        if "stages" in cfg:
            stages = []
            for sc in cfg["stages"]:
                if not isinstance(sc, Mapping) or sc.get("id") not in _REGISTRY:
                    raise SpecError(f"bad stage config {sc!r}")
                stages.append(_REGISTRY[sc["id"]].from_config(sc))
            pipe = cls(stages)
            if "spec" in cfg and parse_spec(cfg["spec"]).spec != pipe.spec:
                raise SpecError(f"config spec {cfg['spec']!r} disagrees with its stages "
                                f"({pipe.spec!r})")
            return pipe
        if "spec" in cfg:
            return parse_spec(cfg["spec"])
        raise SpecError("pipeline config needs 'spec' or 'stages'")

    # -- encode -----------------------------------------------------------------------------
    def _items(self, tensors: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
        if not isinstance(tensors, Mapping):
            raise CodecError(f"tensors must be a mapping name -> array, got "
                             f"{type(tensors).__name__}")
        if len(tensors) > MAX_TENSORS:
            raise CodecError(f"too many tensors ({len(tensors)} > {MAX_TENSORS})")
        items = [(name, _to_float32(name, t)) for name, t in tensors.items()]
        for name, x in items:
            if x.ndim > MAX_NDIM:
                raise CodecError(f"tensor {name!r} has {x.ndim} dims (max {MAX_NDIM})")
        return items

    def encode(self, tensors: Mapping[str, Any]) -> bytes:
        """Encode an ordered mapping of float tensors into one self-describing payload."""
        items = self._items(tensors)
        table = [(name, tuple(int(d) for d in x.shape)) for name, x in items]
        header = _encode_header(self.spec, table)
        body: list = []
        with _ARENA:  # body parts may be views of scratch memory until joined below
            (self.sparsifier or _DENSE).encode_all(items, self.value_coder, body)
            if not self.lossless:
                return b"".join([header, *body])
            data = b"".join(body)
        for st in self.lossless:
            comp = st.encode_bytes(data)
            data = b"".join([uvarint(len(data)), comp])
        return header + data

    def predicted_size(self, tensors: Mapping[str, Any]) -> int:
        """Exact ``len(self.encode(tensors))`` computed by formula from the data.

        Raises NotImplementedError with lossless stages (the compressed size is not a formula)."""
        if self.lossless:
            raise NotImplementedError(
                f"the size after {self.lossless[0].spec_part()} depends on the compressor")
        items = self._items(tensors)
        table = [(name, tuple(int(d) for d in x.shape)) for name, x in items]
        return _header_size(self.spec, table) + (self.sparsifier or _DENSE).size_all(
            items, self.value_coder)

    # -- decode -----------------------------------------------------------------------------
    def decode(self, payload, expected: Mapping[str, Sequence[int]] | None = None,
               max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, np.ndarray]:
        """Decode a payload made by this pipeline (CodecError if it names another spec)."""
        return _decode(payload, expected, max_elements, self)

    def _decode_body(self, r: Reader, table, max_elements: int) -> dict[str, np.ndarray]:
        sp = self.sparsifier or _DENSE
        vc = self.value_coder
        bound = sum(sp.max_size(name, shape, vc) for name, shape in table)
        bounds = [bound]
        for st in self.lossless:
            bounds.append(st.max_encoded_size(bounds[-1]) + 10)
        for i in range(len(self.lossless) - 1, -1, -1):
            st = self.lossless[i]
            raw_len = r.uvarint(f"{st.spec_part()} raw length", bounds[i])
            data = st.decode_bytes(r.take(r.remaining, f"{st.spec_part()} data"), raw_len)
            if len(data) != raw_len:
                raise CodecError(f"{st.spec_part()} produced {len(data)} bytes, header says "
                                 f"{raw_len}")
            r = Reader(data)
        out = sp.decode_all(r, table, vc)
        r.done("body")
        return out


_DENSE = Dense()


def _decode(payload, expected, max_elements, pipe: Pipeline | None) -> dict[str, np.ndarray]:
    try:
        max_elements = int(max_elements)
        got, table, r = read_header(payload, max_elements)
        if pipe is not None and got.spec != pipe.spec:
            raise CodecError(f"payload was encoded with {got.spec!r}, this pipeline is "
                             f"{pipe.spec!r}")
        _check_expected(table, expected)
        return got._decode_body(r, table, max_elements)
    except CodecError:
        raise
    except Exception as err:  # defence in depth: nothing but CodecError may escape a decode
        raise CodecError(f"unexpected decoder failure ({type(err).__name__}: {err})") from err


def decode_payload(payload, expected: Mapping[str, Sequence[int]] | None = None,
                   max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, np.ndarray]:
    """Decode any payload; the header names the codec chain, so no side information is needed.

    ``expected``: optional ``{name: shape}``; a missing/extra name or a wrong shape raises
    CodecError naming the tensor. ``max_elements``: a payload declaring more elements in total
    raises CodecError before anything is allocated."""
    return _decode(payload, expected, max_elements, None)
