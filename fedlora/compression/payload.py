"""The payload format, the :class:`Pipeline` that writes and reads it, and the decoder's contract.

Payload layout (all integers are unsigned LEB128 varints (``binary.py``) unless stated;
floats and fixed-width integers are little-endian)::

    magic        3 bytes  b"FLC"
    version      1 byte   1 (tensor table by names) or 2 (tensor table by digest)
    spec         varint length + UTF-8 canonical spec (names every stage and its arguments)
    table        version 1: n_tensors (varint), then n_tensors x name (varint length + UTF-8),
                            ndim (varint), ndim dims (varints)
                 version 2: 8 bytes, the table digest (below); the tensors are those the
                            receiver expects, in the order of their names
    body         the raw body, or, per lossless stage (outermost last in the spec, first here):
                 varint raw length + compressed bytes of the next inner layer
    raw body     for each tensor, in header order: [sparsifier section][value section]

Version 2 is for peers that both know what travels (fedlora's nodes and server always decode
with the expected shapes): the names and shapes, ~25 bytes a tensor (0.7 kB for ResNet-8's 29
tensors, a third of a rank-4 FLoCoRA sign message), become :func:`table_digest`, the first 8
bytes of BLAKE2b over the version-1 table of the tensors sorted by name. The receiver computes the
digest of the tensors it expects and refuses a payload whose digest differs, naming both, so a
sender and receiver that disagree on a name, a shape or the set of tensors get a clear error, never
a body read against the wrong table. It cannot be decoded without ``expected``.

The header is never compressed, so a receiver validates names, shapes, ``expected`` and the
memory contract below before touching (or decompressing) the body. Every count in the body is
implied by the header shapes plus the section's own small fields, so the body is self-delimiting
and any trailing byte is an error. The per-tensor sections (codec parameters: index coding, kept
ranks, scales/zero-points) are documented in each codec's module: ``sparsify.py``, ``ranks.py``,
``quantize.py``, ``casts.py``, ``lowrank.py``, ``lossless.py``. With no sparsifier, a tensor's raw section is just
its value section. Spec grammar: ``spec.py``.

Decoding is hardened for untrusted input: any malformed payload raises :class:`CodecError`
(never another exception), sizes are checked against the limits and against the bytes actually
present before anything is allocated, and decoded values are guaranteed finite float32. Header
limits: spec <= 256 bytes, <= 65536 tensors, ndim <= 32, every dim and the total element count
<= ``max_elements`` (default 2**28).

Memory contract of :func:`decode_payload` / :meth:`Pipeline.decode`. Let ``P`` be the payload's
length in bytes, ``T`` the number of tensors its header declares (every entry but one takes at
least 3 header bytes, so ``T <= P/3 + 1``) and ``D`` = 4 x (their total element count), the bytes
of the float32 tensors a decode returns.

1. With ``expected`` shapes the header must declare exactly those tensors: ``D`` is the size the
   caller asked for.
2. Without ``expected`` the header must satisfy ``D <= E x P + 1 MiB`` (:data:`OUTPUT_ALLOWANCE`),
   checked right after the header is read, before any tensor or body buffer is allocated, where
   ``E`` = :attr:`Pipeline.max_expansion` is the product of the stages' legitimate expansion
   factors, capped at :data:`MAX_EXPANSION` = 4096:

   ====================  ======  ==========================================================
   stage                 factor  why
   ====================  ======  ==========================================================
   ``fp32``              1       4 bytes in per value
   ``fp16``, ``bf16``    2       2 bytes in per value
   ``affine:b``          32/b    b bits in per value (1-D tensors travel as fp32)
   no sparsifier         1
   ``topk:d``            2/d     ``floor(d*N) >= d*N/2`` values travel once ``d*N >= 1``
                                 (smaller messages fit in the 1 MiB allowance)
   ``drive``, ``eden:b`` 32/b    b bits in per value (below one bit: the sampled fraction)
   ``ranks``             16      policy: the kept rank slices average at least 1/16 of the
                                 factors (a LoRA-A2 budget of 1 rank in 16 still fits)
   ``lowrank:r``         64      policy: a ``d x d`` matrix in rank ``r`` expands ``d/2r``
                                 times (ResNet-8's widest conv at rank 2: 29x)
   ``zstd`` (each)       32      policy: float data compresses far less
   ====================  ======  ==========================================================

   A legitimate payload beyond this bound (an all-zero update squeezed 1000x by zstd, top-k at
   density 1e-4 of a large model) decodes when the caller passes the ``expected`` shapes.
3. A lossless layer's raw length must not exceed the largest raw body the header shapes allow
   (at most about ``2.3 x D`` + 16 bytes a tensor + 1 KiB a lossless stage) and must equal the
   zstd frame's declared content size, both checked before decompressing; decompression then
   writes into one buffer of exactly that size (``lossless.py``), whatever the frame contains.
4. The peak of what a decode allocates (Python and numpy memory, as ``tracemalloc`` counts it)
   stays below :func:`peak_bound` ``= 6 x D + 1 KiB x T + 4 MiB``. The largest terms: an
   ``affine`` tensor of one value per slice (8 parameter bytes a value) under ``zstd``, about
   ``5.4 x D``; a top-k bitmap that keeps almost everything under ``zstd``, about ``3.3 x D``.

Without ``expected`` shapes rules 2 and 4 give at most ``(6 x E + 342) x P + 11 MiB``: a 30-byte
payload costs at most about 11 MiB, never the 1 GiB its header may declare; with them, at most
``6 x D + 342 x P + 5 MiB`` for the ``D`` the caller expects. ``tests/test_codec_contract.py``
measures both, and the process's peak RSS for a zstd bomb (zstd's own working memory is outside
``tracemalloc``; single-shot decompression into the exact buffer needs no window buffer).

Adding a stage: state its factor in :meth:`Codec.max_expansion` and keep rule 4 true.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .arrays import to_float32
from .binary import Reader, uvarint, uvarint_len
from .codec import Dense, LosslessCodec, Sparsifier, ValueCoder, slice_groups
from .errors import CodecError, SpecError
from .quantize import FlatDense
from .runtime import scratch_scope
from .spec import MAX_SPEC_BYTES, chain_of, parse_stages, stages_from_config

__all__ = ["Pipeline", "parse_spec", "decode_payload", "read_header", "peak_bound", "MAGIC",
           "FORMAT_VERSION", "DIGEST_VERSION", "table_digest", "DEFAULT_MAX_ELEMENTS",
           "MAX_EXPANSION", "OUTPUT_ALLOWANCE"]

MAGIC = b"FLC"
FORMAT_VERSION = 1   # the tensor table by names and shapes
DIGEST_VERSION = 2   # the tensor table by digest
DIGEST_BYTES = 8
DEFAULT_MAX_ELEMENTS = 2 ** 28
MAX_NDIM = 32
MAX_TENSORS = 1 << 16
MAX_EXPANSION = 4096
OUTPUT_ALLOWANCE = 1 << 20


def peak_bound(declared_bytes: int, n_tensors: int) -> int:
    """Rule 4 of the memory contract: the most a decode of a payload declaring ``n_tensors``
    tensors of ``declared_bytes`` float32 bytes in all may allocate at once, in bytes."""
    return 6 * declared_bytes + 1024 * n_tensors + (4 << 20)


# --------------------------------------------------------------------------------------------
# header


def _encode_table(table) -> list[bytes]:
    parts = [uvarint(len(table))]
    for name, shape in table:
        nb = name.encode("utf-8")
        parts += [uvarint(len(nb)), nb, uvarint(len(shape))]
        parts += [uvarint(d) for d in shape]
    return parts


def table_digest(table) -> bytes:
    """The version-2 header's stand-in for ``table`` (``(name, shape)`` pairs): BLAKE2b-64 of
    the version-1 table encoding of the pairs sorted by name."""
    return _sorted_digest(sorted((str(name), tuple(int(d) for d in shape))
                                for name, shape in table))


def _sorted_digest(ordered) -> bytes:
    """:func:`table_digest` of a table already in name order."""
    return hashlib.blake2b(b"".join(_encode_table(ordered)), digest_size=DIGEST_BYTES).digest()


def _encode_header(spec: str, table: list[tuple[str, tuple[int, ...]]],
                   by_digest: bool = False) -> bytes:
    """The header; with ``by_digest`` the table must already be in name order (``encode``)."""
    sb = spec.encode("utf-8")
    version = DIGEST_VERSION if by_digest else FORMAT_VERSION
    parts = [MAGIC, bytes([version]), uvarint(len(sb)), sb]
    parts += [_sorted_digest(table)] if by_digest else _encode_table(table)
    return b"".join(parts)


def _header_size(spec: str, table, by_digest: bool = False) -> int:
    sb = len(spec.encode("utf-8"))
    n = len(MAGIC) + 1 + uvarint_len(sb) + sb
    if by_digest:
        return n + DIGEST_BYTES
    n += uvarint_len(len(table))
    for name, shape in table:
        nb = len(name.encode("utf-8"))
        n += uvarint_len(nb) + nb + uvarint_len(len(shape)) + sum(uvarint_len(d) for d in shape)
    return n


def read_header(payload, max_elements: int = DEFAULT_MAX_ELEMENTS,
                expected: Mapping[str, Sequence[int]] | None = None):
    """Parse and validate the header. Returns ``(pipeline, table, reader)``, the reader positioned
    at the body; ``table`` is a list of ``(name, shape)`` in body order. A version-2 header
    (table by digest) is checked against ``expected`` and its table is ``expected``'s, sorted by
    name; without ``expected`` its ``table`` is None (the spec can still be read). CodecError on
    any problem."""
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
    if ver not in (FORMAT_VERSION, DIGEST_VERSION):
        raise CodecError(f"unsupported payload format version {ver} (this decoder reads "
                         f"{FORMAT_VERSION} and {DIGEST_VERSION})")
    slen = r.uvarint("spec length", MAX_SPEC_BYTES)
    try:
        spec = bytes(r.take(slen, "spec")).decode("utf-8")
        pipe = parse_spec(spec)
    except (UnicodeDecodeError, SpecError) as err:
        raise CodecError(f"payload header names a bad codec spec: {err}") from None
    if pipe.spec != spec:
        raise CodecError(f"payload spec {spec!r} is not canonical (expected {pipe.spec!r})")
    if ver == DIGEST_VERSION:
        return pipe, _digest_table(bytes(r.take(DIGEST_BYTES, "table digest")), expected,
                                   max_elements), r
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


@functools.lru_cache(maxsize=64)
def _sorted_table(items: tuple) -> tuple[tuple, int, bytes]:
    """``expected``'s table in name order, its element count and its digest (a server decodes
    every reply of a round against the same expected tensors)."""
    table = tuple(sorted(items))
    return table, sum(math.prod(shape) for _, shape in table), _sorted_digest(table)


def _digest_table(got: bytes, expected, max_elements: int):
    """The table a version-2 header stands for: ``expected``'s, sorted by name, if its digest is
    the one the payload carries (None without ``expected``)."""
    if expected is None:
        return None
    table, total, want = _sorted_table(tuple((str(k), tuple(int(d) for d in v))
                                             for k, v in expected.items()))
    if total > max_elements:
        raise CodecError(f"the expected tensors hold {total} elements, over "
                         f"max_elements={max_elements}")
    if got != want:
        raise CodecError(f"payload names its tensors by table digest {got.hex()}, the "
                         f"{len(table)} expected tensors have digest {want.hex()}: sender and "
                         f"receiver disagree on the names or shapes that travel")
    return table


def _check_expected(table, expected: Mapping[str, Sequence[int]]) -> None:
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


def _check_expansion(pipe: "Pipeline", table, payload_len: int) -> None:
    """Rule 2 of the memory contract (no ``expected`` shapes)."""
    declared = 4 * sum(math.prod(shape) for _, shape in table)
    limit = OUTPUT_ALLOWANCE + math.floor(pipe.max_expansion * payload_len)
    if declared > limit:
        raise CodecError(
            f"a {payload_len}-byte {pipe.spec!r} payload declares {declared} bytes of tensors; "
            f"without expected shapes it may declare at most {limit} ({pipe.max_expansion:g} x "
            f"its size + {OUTPUT_ALLOWANCE}): pass the expected shapes to decode it")


# --------------------------------------------------------------------------------------------
# the pipeline


class Pipeline:
    """A parsed codec chain: ``encode`` tensors to a self-describing payload, ``decode`` it back."""

    def __init__(self, stages: Sequence[Any], _spec_text: str | None = None):
        chain = chain_of(stages, _spec_text)
        self.sparsifier: Sparsifier | None = chain.sparsifier
        self.value_coder: ValueCoder = chain.value_coder
        self.lossless: list[LosslessCodec] = chain.lossless
        self.spec: str = chain.spec
        #: the codec key of one message (``codec_key``), for stages that need one (``drive``,
        #: ``eden``: their rotation and sampling); never part of the payload
        self.key: int | None = None

    @property
    def needs_key(self) -> bool:
        """Whether a stage of the chain needs the codec key (:meth:`keyed`)."""
        return self.value_coder.needs_key

    def keyed(self, key: int | None) -> "Pipeline":
        """This chain with codec key ``key`` (both ends derive it: ``codec_key``); the chain
        itself when no stage needs a key."""
        if not self.needs_key or key == self.key:
            return self
        out = Pipeline(self.stages)
        out.key = None if key is None else int(key) & 0xFFFFFFFFFFFFFFFF
        return out

    # -- identity -------------------------------------------------------------------------
    @property
    def stages(self) -> list[Any]:
        out: list[Any] = [self.sparsifier] if self.sparsifier is not None else []
        return out + [self.value_coder] + list(self.lossless)

    @property
    def max_expansion(self) -> float:
        """``E`` of the memory contract: the product of the stages' factors, at most 4096."""
        e = (self.sparsifier or _DENSE).max_expansion() * self.value_coder.max_expansion()
        for st in self.lossless:
            e *= st.max_expansion()
        return min(float(e), float(MAX_EXPANSION))

    @property
    def for_updates_only(self) -> bool:
        """Whether a stage of the chain encodes updates only (``sign``, ``lowrank``)."""
        return any(st.for_updates_only for st in self.stages)

    def with_sparsifier(self, sparsifier: "Sparsifier | None") -> "Pipeline":
        """This chain with its sparsifier stage replaced by ``sparsifier`` (None: removed), e.g.
        a method that adds its own ``topk``/``ranks`` to the user's value coder and lossless
        stages."""
        rest = [s for s in self.stages if s.kind != "sparsifier"]
        return Pipeline(([sparsifier] if sparsifier is not None else []) + rest).keyed(self.key)

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
            pipe = cls(stages_from_config(cfg["stages"]))
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
        items = [(name, to_float32(name, t)) for name, t in tensors.items()]
        for name, x in items:
            if x.ndim > MAX_NDIM:
                raise CodecError(f"tensor {name!r} has {x.ndim} dims (max {MAX_NDIM})")
        return items

    def encode(self, tensors: Mapping[str, Any], by_digest: bool = False) -> bytes:
        """Encode an ordered mapping of float tensors into one self-describing payload;
        ``by_digest``: a version-2 header (the table as a digest, the body in name order), for a
        receiver that decodes with the expected shapes."""
        items = self._items(tensors)
        if by_digest:
            items.sort(key=lambda item: item[0])
        table = [(name, tuple(int(d) for d in x.shape)) for name, x in items]
        header = _encode_header(self.spec, table, by_digest)
        body: list = []
        with scratch_scope():  # body parts may be views of scratch memory until joined below
            if self.value_coder.whole_body:
                self.value_coder.encode_body(items, self.key, body)
            else:
                (self.sparsifier or _DENSE).encode_all(items, self.value_coder, body)
            if not self.lossless:
                return b"".join([header, *body])
            data = b"".join(body)
        for st in self.lossless:
            comp = st.encode_bytes(data)
            data = b"".join([uvarint(len(data)), comp])
        return header + data

    def predicted_size(self, tensors: Mapping[str, Any], by_digest: bool = False) -> int:
        """Exact ``len(self.encode(tensors))`` computed by formula from the data.

        Raises NotImplementedError with lossless stages (the compressed size is not a formula)."""
        if self.lossless:
            raise NotImplementedError(
                f"the size after {self.lossless[0].spec_part()} depends on the compressor")
        items = self._items(tensors)
        table = [(name, tuple(int(d) for d in x.shape)) for name, x in items]
        if self.value_coder.whole_body:
            return _header_size(self.spec, table, by_digest) + self.value_coder.body_size(
                [x.size for _, x in items])
        return _header_size(self.spec, table, by_digest) + (self.sparsifier or _DENSE).size_all(
            items, self.value_coder)

    # -- decode -----------------------------------------------------------------------------
    def decode(self, payload, expected: Mapping[str, Sequence[int]] | None = None,
               max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, np.ndarray]:
        """Decode a payload made by this pipeline (CodecError if it names another spec); the
        arguments and the memory contract are those of :func:`decode_payload`; the codec key is
        this pipeline's."""
        return _decode(payload, expected, max_elements, self, self.key)

    def sections(self, payload, expected: Mapping[str, Sequence[int]],
                 max_elements: int = DEFAULT_MAX_ELEMENTS, flat: bool = False):
        """The checked value sections of a payload of this dense chain (no sparsifier, no
        lossless stage; NotImplementedError otherwise), in ``expected``'s order: every check
        :meth:`decode` makes, the same CodecErrors, but the values left unformed where the
        value coder allows (``affine``: :class:`~.quantize.AffineSection`), so a consumer can
        decode them straight into a running sum (``strategies/stream.py``). ``section.values(
        shape)`` is what :meth:`decode` returns for that tensor. With ``flat``: one
        :class:`~.quantize.FlatDense` (every section in flat arrays, in the payload's table order;
        read by one compiled pass where the value coder has one, ``ValueCoder.read_flat``)."""
        if self.sparsifier is not None or self.lossless or self.value_coder.whole_body:
            raise NotImplementedError(f"{self.spec!r}: sections are for dense chains without "
                                      "lossless stages, coded tensor by tensor")
        return _sections(payload, expected, max_elements, self, flat)

    def sparse_sections(self, payload, expected: Mapping[str, Sequence[int]],
                        max_elements: int = DEFAULT_MAX_ELEMENTS, flat: bool = False):
        """The checked sections of a payload of a ``topk`` chain (lossless stages allowed;
        NotImplementedError for any other sparsifier), in ``expected``'s order: every check
        :meth:`decode` makes, the same CodecErrors, but each tensor's kept values left where
        they are (:class:`~.sparsify.SparseSection`: positions and values), so a consumer can
        add them straight into a running sum (``strategies/stream.py``). ``section.values(
        shape)`` is what :meth:`decode` returns for that tensor. With ``flat`` and ``fp32`` or
        ``affine`` values: one :class:`~.sparsify.FlatSparse` (every tensor in flat arrays, in the
        payload's table order; ``TopK.read_flat``) instead of the dict."""
        if getattr(self.sparsifier, "read_sparse", None) is None:
            raise NotImplementedError(f"{self.spec!r}: sparse sections are for topk chains")
        try:
            _, table, r = _open(payload, expected, max_elements, self)
            _check_expected(table, expected)
            out = self._decode_body(r, table, sparse="flat" if flat else True)
            return out if not isinstance(out, dict) else {name: out[name] for name in expected}
        except CodecError:
            raise
        except Exception as err:  # defence in depth, as _decode
            raise CodecError(f"unexpected decoder failure ({type(err).__name__}: {err})") from err

    def _decode_body(self, r: Reader, table, sparse: bool | str = False) -> Any:
        sp = self.sparsifier or _DENSE
        vc = self.value_coder
        if vc.whole_body:
            bound = vc.body_size([math.prod(shape) for _, shape in table])
        else:
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
        out = None
        if sparse == "flat":
            out = sp.read_flat(r, table, vc)
        if out is None and vc.whole_body:
            out = vc.decode_body(r, table, self.key)
        elif out is None:
            out = sp.read_sparse(r, table, vc) if sparse else sp.decode_all(r, table, vc)
        r.done("body")
        return out


_DENSE = Dense()


def parse_spec(spec: str | Pipeline) -> Pipeline:
    """Parse ``"topk:0.05|affine:4|zstd"`` into a :class:`Pipeline` (grammar: ``spec.py``); a
    Pipeline is returned as is. SpecError on a bad spec."""
    if isinstance(spec, Pipeline):
        return spec
    return Pipeline(parse_stages(spec), _spec_text=spec)


def _open(payload, expected, max_elements, pipe: Pipeline | None):
    """``read_header`` plus the checks every decode makes before the body: the chain is
    ``pipe``'s (when given) and the table is known. ``(pipeline, table, reader)``."""
    got, table, r = read_header(payload, int(max_elements), expected)
    if pipe is not None and got.spec != pipe.spec:
        raise CodecError(f"payload was encoded with {got.spec!r}, this pipeline is "
                         f"{pipe.spec!r}")
    if table is None:
        raise CodecError("payload names its tensors by a digest of their table; decoding "
                         "it needs the expected names and shapes")
    return got, table, r


def _sections(payload, expected, max_elements, pipe: Pipeline, flat: bool = False):
    try:
        _, table, r = _open(payload, expected, max_elements, pipe)
        _check_expected(table, expected)
        vc = pipe.value_coder
        got = vc.read_flat(r, table) if flat else None
        if got is not None:
            return got
        out = {name: vc.read_section(r, shape, slice_groups(shape), name)
               for name, shape in table}
        r.done("body")
        if flat:  # refused by the compiled pass, accepted here (none is known): this answer
            return FlatDense.of([name for name, _ in table], out, np.frombuffer(r.buf, np.uint8))
        return {name: out[name] for name in expected}
    except CodecError:
        raise
    except Exception as err:  # defence in depth, as _decode
        raise CodecError(f"unexpected decoder failure ({type(err).__name__}: {err})") from err


def _decode(payload, expected, max_elements, pipe: Pipeline | None,
            key: int | None = None) -> dict[str, np.ndarray]:
    try:
        got, table, r = _open(payload, expected, max_elements, pipe)
        got = got.keyed(key)
        if expected is None:
            _check_expansion(got, table, r.end)
            return got._decode_body(r, table)
        _check_expected(table, expected)
        out = got._decode_body(r, table)
        if r.buf[len(MAGIC)] == DIGEST_VERSION:  # body in name order: give the caller's
            return {name: out[name] for name in expected}
        return out
    except CodecError:
        raise
    except Exception as err:  # defence in depth: nothing but CodecError may escape a decode
        raise CodecError(f"unexpected decoder failure ({type(err).__name__}: {err})") from err


def decode_payload(payload, expected: Mapping[str, Sequence[int]] | None = None,
                   max_elements: int = DEFAULT_MAX_ELEMENTS,
                   key: int | None = None) -> dict[str, np.ndarray]:
    """Decode any payload; the header names the codec chain, so no side information is needed.

    ``expected``: optional ``{name: shape}``; a missing/extra name or a wrong shape raises
    CodecError naming the tensor. ``max_elements``: a payload declaring more elements in total
    raises CodecError before anything is allocated. Without ``expected``, a header declaring more
    than ``Pipeline.max_expansion`` x its size (+1 MiB) of tensors is refused the same way: see
    the memory contract in this module's docstring. ``key``: the codec key, for a chain that
    needs one (``drive``, ``eden``; CodecError without it)."""
    return _decode(payload, expected, max_elements, None, key)
