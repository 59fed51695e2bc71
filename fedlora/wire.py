"""The only bridge between codec payloads and Flower records, and the byte accounting.

An encoded message travels as ONE Flower ``Array`` (key ``payload``) in an ``ArrayRecord``:
``dtype="uint8"``, ``shape=(len(payload),)``, ``stype="fedlora/v1;<codec spec>"``, ``data`` = the
codec payload (itself self-describing, see ``fedlora.compression.payload``). One Array per message
instead of one per tensor keeps Flower's per-object overhead (~315 B per Array) out of small
adapter messages.

Bytes are measured, not computed: :func:`message_bytes` is the size of the object tree Flower
1.41 moves for a message's content (Message → RecordDict → records → Array → chunks), the exact
bytes pushed/pulled over HTTP(S) in deployment and the would-be size in simulation.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from .compression import CodecError, Pipeline, decode_payload, parse_spec

STYPE_PREFIX = "fedlora/v1;"
PAYLOAD_KEY = "payload"


def encode_record(tensors: Mapping[str, np.ndarray], pipe: "Pipeline | str") -> ArrayRecord:
    """Encode ``tensors`` with a codec chain (a parsed :class:`Pipeline`, or a spec string)
    into a one-Array ArrayRecord."""
    if not isinstance(pipe, Pipeline):
        pipe = parse_spec(pipe)
    return payload_record(pipe.encode(tensors), pipe.spec)


def payload_record(payload: bytes, spec: str) -> ArrayRecord:
    """Wrap an already encoded payload (made with the chain ``spec``) as a one-Array record."""
    arr = Array(dtype="uint8", shape=(len(payload),), stype=STYPE_PREFIX + spec, data=payload)
    return ArrayRecord({PAYLOAD_KEY: arr})


def decode_record(record: ArrayRecord, expected: Mapping[str, tuple[int, ...]] | None = None,
                  ) -> dict[str, np.ndarray]:
    """Decode an ArrayRecord made by :func:`encode_record`; any problem raises CodecError."""
    if not isinstance(record, ArrayRecord):
        raise CodecError(f"expected an ArrayRecord, got {type(record).__name__}")
    if list(record.keys()) != [PAYLOAD_KEY]:
        raise CodecError(f"ArrayRecord must hold exactly one {PAYLOAD_KEY!r} Array, "
                         f"has {list(record.keys())[:5]}")
    arr = record[PAYLOAD_KEY]
    if not arr.stype.startswith(STYPE_PREFIX):
        raise CodecError(f"unknown Array stype {arr.stype!r} (expected {STYPE_PREFIX}...)")
    try:
        parse_spec(arr.stype[len(STYPE_PREFIX):])
    except ValueError as err:
        raise CodecError(f"Array stype names a bad codec chain: {err}") from err
    return decode_payload(bytes(arr.data), expected=expected)


def payload_bytes(record: ArrayRecord) -> int:
    """Size of the codec payload(s) alone (what the codec produced)."""
    return sum(len(record[k].data) for k in record.keys())


def message_bytes(msg: Message) -> int:
    """Bytes of the object tree Flower serializes for this message's content (wire bytes)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
