"""Codec stages: the :class:`Codec` base, its three kinds (:class:`Sparsifier`, :class:`ValueCoder`,
:class:`LosslessCodec`), the implicit :class:`Dense` sparsifier, and the registry the spec parser
looks stage ids up in (:func:`register`, :func:`registered_ids`, :func:`codec_class`).

Adding a codec: one module with a subclass of one of the three kinds, decorated with
:func:`register` and imported by ``fedlora/compression/__init__.py``. Besides its encode/decode
hooks, every stage states :meth:`Codec.max_expansion`, the most its decoded output may outgrow its
input on legitimate data; the decoder's memory contract (``payload.py``) is built from it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .binary import Reader
from .errors import SpecError

if TYPE_CHECKING:  # pragma: no cover  (annotations only: quantize imports this module)
    from .quantize import FlatDense

__all__ = ["Codec", "Sparsifier", "ValueCoder", "LosslessCodec", "Dense", "slice_groups",
           "register", "registered_ids", "codec_class", "Section", "DenseSection"]

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


def codec_class(cid: str) -> type["Codec"] | None:
    """The registered codec class of stage id ``cid``, or None."""
    return _REGISTRY.get(cid)


class Codec:
    """One pipeline stage. Subclasses set ``codec_id`` and ``kind`` and implement the hooks."""

    codec_id: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "sparsifier" | "value" | "lossless"
    #: the stage only makes sense for updates (deltas), never for weights (``sign``: a weight
    #: tensor would decode to +-its mean magnitude; ``lowrank``: a weight matrix cut to rank r);
    #: the strategy refuses a chain with such a stage for anything that carries weights
    for_updates_only: ClassVar[bool] = False

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
        cls.check_config_keys(cfg, ())
        return cls()

    @classmethod
    def check_config_keys(cls, cfg: Mapping[str, Any], allowed: Iterable[str]) -> None:
        """SpecError naming the keys of ``cfg`` other than ``id`` and ``allowed``."""
        extra = set(cfg) - {"id", *allowed}
        if extra:
            raise SpecError(f"{cls.codec_id}: unknown config keys {sorted(extra)}")

    def max_expansion(self) -> float:
        """Upper bound, on legitimate data, of (bytes this stage's decoder produces) / (bytes it
        reads): a value coder's float32 output over its value section, a sparsifier's dense
        output over its kept values (index bytes not counted), a lossless stage's decompressed
        size over its compressed size. A decoder without expected shapes refuses a payload whose
        declared tensors outgrow it by more than the product (see ``payload.py``)."""
        raise NotImplementedError

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
    #: the coder writes the whole raw body at once (``encode_body(items, key, out)``,
    #: ``decode_body(r, table, key)``, ``body_size(sizes)``: ``eden.py``) instead of one value
    #: section a tensor; no sparsifier may precede it
    whole_body: ClassVar[bool] = False
    #: the coder needs the pipeline's codec key (``Pipeline.keyed``) to encode and decode
    needs_key: ClassVar[bool] = False

    def encode_values(self, x: np.ndarray, groups: int, out: list) -> None:
        raise NotImplementedError

    def values_size(self, x: np.ndarray, groups: int) -> int:
        raise NotImplementedError

    def max_values_size(self, n: int, groups: int) -> int:
        raise NotImplementedError

    def decode_values(self, r: Reader, shape: tuple[int, ...], groups: int,
                      name: str) -> np.ndarray:
        raise NotImplementedError

    def read_section(self, r: Reader, shape: tuple[int, ...], groups: int,
                     name: str) -> "Section":
        """The value section, checked exactly as :meth:`decode_values` checks it, where a coder
        can leave the float32 values unformed (``affine``: its scales, zero-points and packed
        bytes, for a consumer that decodes into a running sum). Default: the decoded values."""
        return DenseSection(self.decode_values(r, shape, groups, name).reshape(-1))

    def read_flat(self, r: Reader, table) -> "FlatDense | None":
        """Every section of a dense body (the rest of ``r``: nothing may follow it) read by
        one compiled pass into a :class:`~.quantize.FlatDense`, where a coder has such a reader
        (``fp32``, ``affine``). None, with ``r`` unread, otherwise and for a body the pass
        refuses: the caller then reads the sections one by one (:meth:`read_section`), which
        raise the CodecError naming what was wrong."""
        return None


class Section:
    """A checked value section of ``n`` values (:meth:`ValueCoder.read_section`)."""

    kind: ClassVar[str] = ""
    n: int

    def values(self, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 values, as :meth:`ValueCoder.decode_values` returns them."""
        raise NotImplementedError


class DenseSection(Section):
    """Values already in float32 (flat, finite; possibly a read-only view of the payload)."""

    kind = "dense"

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.n = int(x.size)

    def values(self, shape):
        out = np.empty(shape, np.float32)
        out.reshape(-1)[...] = self.x
        return out


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
        """Decode to exactly ``raw_len`` bytes (already checked against a bound) or CodecError;
        must never hold more than ``raw_len`` output bytes, whatever ``data`` claims."""
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

    def max_expansion(self):
        return 1.0

    def decode_all(self, r, table, vc):
        return {name: vc.decode_values(r, shape, slice_groups(shape), name)
                for name, shape in table}
