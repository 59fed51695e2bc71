"""The codec spec grammar: text (or config) -> validated, ordered stages and the canonical spec.

A spec is stages separated by ``|``, each ``id[:arg[:arg]]``: at most one sparsifier first
(``topk:d[:tensor]``, ``ranks``, ``lowrank:r``), at most one value coder (``fp32`` default,
``fp16``, ``bf16``, ``affine:b``, ``sign[:tensor]``, ``drive[:mse]``, ``eden:b[:mse]``; drive /
eden take no sparsifier), then any number of lossless stages (``zstd[:level]``). The canonical
spec (``Pipeline.spec``) orders the stages, removes whitespace, normalises numbers
(``topk:5e-2`` -> ``topk:0.05``, ``zstd:3`` -> ``zstd``) and leaves the default ``fp32`` out
unless it is the only stage; at most :data:`MAX_SPEC_BYTES` bytes of UTF-8. Stage ids are
looked up in ``codec.py``'s registry; each stage parses its own arguments (``from_args``) and
config (``from_config``). :func:`fedlora.compression.parse_spec` turns a spec into a
:class:`~.payload.Pipeline`. The full grammar: docs/wire-format.md ("Spec grammar").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .codec import Codec, LosslessCodec, Sparsifier, ValueCoder, codec_class, registered_ids
from .errors import SpecError

__all__ = ["MAX_SPEC_BYTES", "Chain", "parse_stages", "stages_from_config", "chain_of"]

MAX_SPEC_BYTES = 256
_KIND_ORDER = {"sparsifier": 0, "value": 1, "lossless": 2}


class Chain(NamedTuple):
    """Stages sorted by role, with the canonical spec text."""

    sparsifier: Sparsifier | None
    value_coder: ValueCoder
    lossless: list[LosslessCodec]
    spec: str


def _stage_from_text(part: str, spec: str) -> Codec:
    text = part.strip()
    if not text:
        raise SpecError(f"empty stage in spec {spec!r}")
    pieces = [p.strip() for p in text.split(":")]
    cid = pieces[0].lower()
    cls = codec_class(cid)
    if cls is None:
        raise SpecError(f"unknown codec {cid!r} in spec {spec!r} "
                        f"(known: {', '.join(registered_ids())})")
    try:
        return cls.from_args(pieces[1:])
    except SpecError as err:
        raise SpecError(f"bad stage {text!r} in spec {spec!r}: {err}") from None


def parse_stages(spec: str) -> list[Codec]:
    """``"topk:0.05|affine:4|zstd"`` -> its stages, in the order written; SpecError on bad text."""
    if not isinstance(spec, str):
        raise SpecError(f"spec must be a string, got {type(spec).__name__}")
    if not spec.strip():
        raise SpecError("empty codec spec")
    return [_stage_from_text(p, spec) for p in spec.split("|")]


def stages_from_config(configs: Sequence[Mapping[str, Any]]) -> list[Codec]:
    """The stages of ``Pipeline.get_config()["stages"]``; SpecError on a bad entry."""
    stages = []
    for sc in configs:
        cid = sc.get("id") if isinstance(sc, Mapping) else None
        cls = codec_class(cid) if isinstance(cid, str) else None
        if cls is None:
            raise SpecError(f"bad stage config {sc!r}")
        stages.append(cls.from_config(sc))
    return stages


def _check_order(stages: Sequence[Codec], spec: str) -> None:
    seen = {"sparsifier": 0, "value": 0}
    last = -1
    for st in stages:
        if st.kind not in _KIND_ORDER:
            raise SpecError(f"stage {st.spec_part()!r} has unknown kind {st.kind!r}")
        k = _KIND_ORDER[st.kind]
        if k < last:
            raise SpecError(f"stage {st.spec_part()!r} is out of order in spec {spec!r} "
                            "(sparsifier first, then value coder, then lossless stages)")
        last = k
        if st.kind in seen:
            seen[st.kind] += 1
            if seen[st.kind] > 1:
                raise SpecError(f"more than one {st.kind} in spec {spec!r} "
                                f"(second: {st.spec_part()!r})")


def chain_of(stages: Sequence[Codec], text: str | None = None) -> Chain:
    """Validate the order of ``stages`` (``text``: the spec as written, for messages) and build
    the canonical chain; the value coder defaults to ``fp32``. SpecError on a bad chain."""
    stages = list(stages)
    for st in stages:
        if not isinstance(st, Codec):
            raise SpecError(f"pipeline stages must be codecs, got {type(st).__name__}")
    if text is None:
        text = "|".join(s.spec_part() for s in stages)
    _check_order(stages, text)
    sparsifier = next((s for s in stages if s.kind == "sparsifier"), None)
    value_coder = next((s for s in stages if s.kind == "value"), None)
    if value_coder is None:
        value_coder = codec_class("fp32")()
    lossless = [s for s in stages if s.kind == "lossless"]
    if sparsifier is not None and value_coder.whole_body:
        raise SpecError(f"{value_coder.spec_part()} codes the whole update at once; it cannot "
                        f"follow a sparsifier ({sparsifier.spec_part()}) in spec {text!r}")
    parts = []
    if sparsifier is not None:
        parts.append(sparsifier.spec_part())
    if value_coder.codec_id != "fp32" or (sparsifier is None and not lossless):
        parts.append(value_coder.spec_part())
    parts += [s.spec_part() for s in lossless]
    spec = "|".join(parts)
    if len(spec.encode("utf-8")) > MAX_SPEC_BYTES:
        raise SpecError(f"spec {spec!r} is too long")
    return Chain(sparsifier, value_coder, lossless, spec)
