"""Replies as node input: what a valid upload is, checked before anything of it is used.

Everything here treats a reply as hostile: ``num-examples`` and metrics are validated
(:func:`positive_examples`, :func:`reply_metrics`), the payload is decoded only with the codec
chain the server asked of that node (:func:`decode_upload`: the payload header must name it)
and into the expected shapes, and values must be finite. Any failure raises
:class:`MalformedReply` or ``CodecError``; the strategy drops that reply with its node id and
reason.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from flwr.app import Message

from ..compression import Pipeline
from ..wire import record_payload
from .protocol import (NUM_EXAMPLES, MalformedReply, TrainReply,  # noqa: F401  (re-exported)
                       positive_examples, reply_metrics)

ADAPTER_KEY = "adapter"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"


@dataclass
class ClientUpdate:
    """One decoded reply: ``num_examples`` as the node reported it, ``weight`` its aggregation
    weight (the reported count until :func:`.guard.cap_reply_weights` caps it), ``metrics``
    every scalar metric it reported and ``reply`` the same, typed (:class:`.protocol.
    TrainReply`: read ``up.reply.params_up``, ``up.reply.rank`` ...)."""

    node_id: int
    tensors: "OrderedDict[str, np.ndarray]"
    num_examples: int
    metrics: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)
    weight: int | None = None
    reply: TrainReply | None = None

    def __post_init__(self) -> None:
        if self.weight is None:
            self.weight = int(self.num_examples)
        if self.reply is None:
            self.reply = TrainReply.from_scalars(self.num_examples, self.metrics)

    @classmethod
    def of(cls, node_id: int, reply: TrainReply, config: dict[str, Any] | None = None
           ) -> "ClientUpdate":
        """A reply's metadata, its tensors not decoded yet."""
        return cls(node_id, OrderedDict(), reply.num_examples, reply.scalars(), config or {},
                   reply=reply)


def train_metrics(updates: "list[ClientUpdate]") -> dict[str, float]:
    """Weighted mean (the aggregation weights) of each reply metric; a mean that overflows is
    left out; ``num-examples`` = the total weight."""
    total = float(sum(u.weight for u in updates))
    keys = sorted({k for u in updates for k in u.metrics if k != NUM_EXAMPLES})
    out: dict[str, float] = {}
    for k in keys:
        v = float(sum((u.weight / total) * u.metrics.get(k, 0.0) for u in updates))
        if math.isfinite(v):
            out[k] = v
    out[NUM_EXAMPLES] = int(total)
    return out


def decode_upload(record: Any, want: Pipeline, shapes: Mapping[str, tuple[int, ...]]
                  ) -> dict[str, np.ndarray]:
    """Decode a reply's payload with the codec chain ``want`` the server asked of that node: the
    record must be one ``fedlora/v2`` payload Array whose header names exactly that chain
    (``Pipeline.decode`` refuses a payload whose header names another), and the tensors must be
    ``shapes``. CodecError otherwise."""
    return want.decode(record_payload(record), expected=shapes)


def read_reply(msg: Message) -> ClientUpdate:
    """Validate a train reply's metadata (an adapter record present, ``num-examples`` and the
    metrics) without decoding its payload: a :class:`ClientUpdate` with no tensors yet.
    MalformedReply on a bad reply."""
    content = msg.content
    if ADAPTER_KEY not in content.array_records:
        raise MalformedReply(f"no ArrayRecord {ADAPTER_KEY!r} in reply")
    if METRICS_KEY not in content.metric_records:
        raise MalformedReply(f"no MetricRecord {METRICS_KEY!r} in reply")
    reply = TrainReply.from_record(content.metric_records[METRICS_KEY])
    cfg = dict(content.config_records[CONFIG_KEY]) if CONFIG_KEY in content.config_records else {}
    return ClientUpdate.of(msg.metadata.src_node_id, reply, cfg)


def decode_tensors(msg: Message, up: ClientUpdate, want: Pipeline,
                   shapes: Mapping[str, tuple[int, ...]]) -> "OrderedDict[str, np.ndarray]":
    """The reply's tensors, decoded with ``want`` into ``shapes``, all finite, and the
    ``params-up`` it reported (``up.metrics``) within the upload's size; CodecError /
    MalformedReply otherwise."""
    tensors = decode_upload(msg.content.array_records[ADAPTER_KEY], want, shapes)
    for k, v in tensors.items():
        if not np.all(np.isfinite(v)):
            raise MalformedReply(f"{k} holds NaN/Inf")
    _check_params_up(up, shapes)
    return OrderedDict(tensors)


def _check_params_up(up: ClientUpdate, shapes: Mapping[str, tuple[int, ...]]) -> None:
    most = sum(math.prod(s) for s in shapes.values())
    sent = up.reply.params_up
    if sent is not None and not 0 <= sent <= most:
        raise MalformedReply(f"params-up {sent!r} is outside [0, {most}]")


#: value coders whose sections are finite by construction (``fp32`` checks, ``affine``'s
#: overflow check bounds every value), so :func:`section_tensors` needs no NaN/Inf pass
SECTION_CODERS = ("fp32", "affine")


def sections_apply(want: Pipeline) -> bool:
    """Whether replies of chain ``want`` can be read as sections (:func:`section_tensors`)."""
    return (want.sparsifier is None and not want.lossless
            and want.value_coder.codec_id in SECTION_CODERS)


def sparse_apply(want: Pipeline) -> bool:
    """Whether replies of chain ``want`` can be read as top-k sections
    (:func:`sparse_tensors`)."""
    return getattr(want.sparsifier, "read_sparse", None) is not None


def sparse_tensors(msg: Message, up: ClientUpdate, want: Pipeline,
                   shapes: Mapping[str, tuple[int, ...]], flat: bool = False):
    """:func:`decode_tensors` for a chain :func:`sparse_apply` admits, without scattering the
    kept values into dense tensors: ``{name: SparseSection}``, every check made (the codec,
    the shapes, finite values, ``params-up``), the same errors. With ``flat``, a reply of
    ``fp32`` or ``affine`` values comes as one ``FlatSparse`` (``Pipeline.sparse_sections``)."""
    secs = want.sparse_sections(record_payload(msg.content.array_records[ADAPTER_KEY]), shapes,
                                flat=flat)
    if not isinstance(secs, dict):  # FlatSparse: its reader checked every value finite
        _check_params_up(up, shapes)
        return secs
    if want.value_coder.codec_id not in SECTION_CODERS:
        for k, sec in secs.items():
            if not np.all(np.isfinite(sec.vals)):
                raise MalformedReply(f"{k} holds NaN/Inf")
    _check_params_up(up, shapes)
    return OrderedDict(secs)


def section_tensors(msg: Message, up: ClientUpdate, want: Pipeline,
                    shapes: Mapping[str, tuple[int, ...]]):
    """:func:`decode_tensors` without forming the values, for a chain :func:`sections_apply`
    admits: the payload's sections in flat form (``FlatDense``, viewing the payload), every
    check made (the codec, the shapes, the section parameters, finite values, ``params-up``),
    the same errors."""
    flat = want.sections(record_payload(msg.content.array_records[ADAPTER_KEY]), shapes,
                         flat=True)
    _check_params_up(up, shapes)
    return flat


def decode_reply(msg: Message, want: Pipeline, shapes: Mapping[str, tuple[int, ...]]
                 ) -> ClientUpdate:
    """Validate and decode one train reply into a :class:`ClientUpdate` (:func:`read_reply`
    then :func:`decode_tensors`); raises CodecError / MalformedReply (or any error on input
    nobody anticipated: the caller drops the reply whatever it raises)."""
    up = read_reply(msg)
    up.tensors = decode_tensors(msg, up, want, shapes)
    return up
