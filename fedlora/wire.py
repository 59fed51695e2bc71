"""The only bridge between codec payloads and Flower records, and the byte accounting.

An encoded message travels as ONE Flower ``Array`` (key ``payload``) in an ``ArrayRecord``:
``dtype="uint8"``, ``shape=(len(payload),)``, ``stype="fedlora/v2"``, ``data`` = the codec payload,
self-describing: its header names the codec chain (see ``fedlora.compression.payload``), which
therefore travels once. (Wire v1 also put the spec in the stype, ``fedlora/v1;<spec>``: 5 bytes
more per fp32 message, 25 per ``topk:0.02|affine:4|zstd`` message; a v1 peer's Array is refused
with a message naming both versions.) One Array per message instead of one per tensor keeps
Flower's per-object overhead (~315 B per Array) out of small adapter messages.

Bytes are measured, not computed: :func:`message_bytes` is the size of the object tree Flower
1.41 moves for a message's content (Message → RecordDict → records → Array → chunks), the exact
bytes pushed/pulled over HTTP(S) in deployment and the would-be size in simulation.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE as MAX_CHUNK
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER

from .compression import CodecError, Pipeline, decode_payload, parse_spec
from .compression.payload import read_header

STYPE = "fedlora/v2"
PAYLOAD_KEY = "payload"


TABLES = ("digest", "names")


def by_digest(payload_table: str) -> bool:
    """Run-config ``payload-table``: ``digest`` (payload format 2: 8 bytes stand for the tensor
    names and shapes both sides know) or ``names`` (format 1: the table spelled out)."""
    if payload_table not in TABLES:
        raise ValueError(f"run-config 'payload-table' must be one of {TABLES}, got "
                         f"{payload_table!r}")
    return payload_table == "digest"


def encode_record(tensors: Mapping[str, np.ndarray], pipe: "Pipeline | str",
                  digest: bool = False) -> ArrayRecord:
    """Encode ``tensors`` with a codec chain (a parsed :class:`Pipeline`, or a spec string)
    into a one-Array ArrayRecord; ``digest``: the tensor table as a digest (the receiver decodes
    with the expected shapes)."""
    if not isinstance(pipe, Pipeline):
        pipe = parse_spec(pipe)
    return payload_record(pipe.encode(tensors, by_digest=digest))


def payload_record(payload: bytes) -> ArrayRecord:
    """Wrap an already encoded payload as a one-Array record."""
    arr = Array(dtype="uint8", shape=(len(payload),), stype=STYPE, data=payload)
    return ArrayRecord({PAYLOAD_KEY: arr})


def record_payload(record: ArrayRecord) -> bytes:
    """The codec payload of a record made by :func:`payload_record`: exactly one ``payload``
    Array of wire version ``fedlora/v2``; CodecError naming what is wrong otherwise."""
    if not isinstance(record, ArrayRecord):
        raise CodecError(f"expected an ArrayRecord, got {type(record).__name__}")
    if list(record.keys()) != [PAYLOAD_KEY]:
        raise CodecError(f"ArrayRecord must hold exactly one {PAYLOAD_KEY!r} Array, "
                         f"has {list(record.keys())[:5]}")
    arr = record[PAYLOAD_KEY]
    if arr.stype != STYPE:
        raise CodecError(f"Array stype {str(arr.stype)[:80]!r} is not fedlora's wire version "
                         f"{STYPE!r} (node and server must run the same fedlora)")
    return bytes(arr.data)


def record_spec(record: ArrayRecord) -> str:
    """The codec chain a record's payload header names (CodecError if the header is bad)."""
    return read_header(record_payload(record))[0].spec


def decode_record(record: ArrayRecord, expected: Mapping[str, tuple[int, ...]] | None = None,
                  key: int | None = None) -> dict[str, np.ndarray]:
    """Decode an ArrayRecord made by :func:`encode_record` with whatever chain its header
    names (``key``: the codec key, for ``drive`` / ``eden``); any problem raises CodecError."""
    return decode_payload(record_payload(record), expected=expected, key=key)


def payload_bytes(record: ArrayRecord) -> int:
    """Size of the codec payload(s) alone (what the codec produced)."""
    return sum(len(record[k].data) for k in record.keys())


def _chunk_head(n: int) -> bytes:
    """Flower 1.41's object head of an ``ArrayChunk`` of ``n`` bytes (type, no children, body
    length) and the head/body divider: what ``add_header_to_object_body`` prepends."""
    return (f"ArrayChunk{HEAD_VALUE_DIVIDER}{HEAD_VALUE_DIVIDER}{n}".encode()
            + HEAD_BODY_DIVIDER)


# (id(payload), chunk size) → (payload, its chunk ids)
_IDS: "OrderedDict[tuple[int, int], tuple[bytes, list[str]]]" = OrderedDict()
_IDS_KEPT = 8


def _chunk_ids(data) -> list[str]:
    """Flower's ids of the chunks of ``data``. One payload object sent to many nodes (a round's
    shared download) is hashed once: the last few ``bytes`` objects' ids are kept, with a
    reference to the object so that its ``id`` cannot be reused while it is cached."""
    key = (id(data), MAX_CHUNK)
    hit = _IDS.get(key) if isinstance(data, bytes) else None
    if hit is not None and hit[0] is data:
        return hit[1]
    view = memoryview(data)
    ids = []
    for start in range(0, len(view), MAX_CHUNK):
        part = view[start:start + MAX_CHUNK]
        h = hashlib.sha256(_chunk_head(len(part)))
        h.update(part)
        ids.append(h.hexdigest())
    if isinstance(data, bytes):
        _IDS[key] = (data, ids)
        while len(_IDS) > _IDS_KEPT:
            _IDS.popitem(last=False)
    return ids


def _memo_ids(data, memo: dict) -> list[str]:
    """:func:`_chunk_ids` of ``data`` once per data object within one count (``memo``: id →
    (data, ids), holding the data so its id stays its own): Flower's inflate gives every key
    of a record its own Array over one shared ``bytes``, so a message may name one payload
    many times for ~80 bytes each, and the 8-entry cache alone would hash it every time."""
    hit = memo.get(id(data))
    if hit is None or hit[0] is not data:
        hit = memo[id(data)] = (data, _chunk_ids(data))
    return hit[1]


def _prime_chunks(arr: Array, memo: dict) -> None:
    """Fill Flower's chunk cache of ``arr`` (what ``Array.slice_array`` computes and keeps) with
    ids hashed straight from the data: Flower's own slicing deflates every chunk into a fresh
    copy (two, with the header) before hashing it. Same chunks, same ids (tested)."""
    if "_chunks" in arr.__dict__:
        return
    data = memoryview(arr.data)
    ids = _memo_ids(arr.data, memo)
    arr.__dict__["_chunks"] = [(cid, ArrayChunk(data[i * MAX_CHUNK:(i + 1) * MAX_CHUNK]))
                               for i, cid in enumerate(ids)]


def _stand_in(msg: Message, memo: dict) -> Message:
    """A copy of ``msg`` whose deflated objects have the lengths of the real ones, with no chunk
    hashed when the message holds one chunk in all (any reply under Flower's 5 MiB chunk size):
    each Array is replaced by one over the same data whose chunk ids are given, not computed —
    a stand-in of 64 hex digits like a SHA-256 for a lone chunk (nothing to be equal to), the
    real SHA-256 ids otherwise (so that equal chunks are one object, as in Flower's tree; each
    data object hashed once however many Arrays name it: :func:`_memo_ids`) — and its parents
    by records holding those.
    Every id in Flower's tree is 64 hex digits whatever it hashes to, so every object deflates
    to the same length and the same objects are unique. ``msg`` itself is not touched."""
    if not msg.has_content() or not msg.content.array_records:
        return msg
    arrays = [a for rec in msg.content.array_records.values() for a in rec.values()]
    lone = sum(-(-len(memoryview(a.data).cast("B")) // MAX_CHUNK) for a in arrays) <= 1

    def array(arr: Array) -> Array:
        out = Array.__new__(Array)
        out.__dict__.update({k: v for k, v in arr.__dict__.items()
                             if k not in ("_chunks", "_object_id")})
        data = memoryview(arr.data).cast("B")
        parts = [data[i:i + MAX_CHUNK] for i in range(0, len(data), MAX_CHUNK)]
        ids = ["0" * 64] * len(parts) if lone else _memo_ids(arr.data, memo)
        out.__dict__["_chunks"] = [(cid, ArrayChunk(p)) for cid, p in zip(ids, parts)]
        out.__dict__["_is_dirty"] = True
        return out

    def record(rec: ArrayRecord) -> ArrayRecord:
        out = ArrayRecord()  # (ArrayRecord(dict) would copy each Array, dropping its chunks)
        for k, a in rec.items():
            out[k] = array(a)
        return out

    content = RecordDict({name: record(rec) if isinstance(rec, ArrayRecord) else rec
                          for name, rec in msg.content.items()})
    out = Message.__new__(Message)
    out.__dict__.update({k: v for k, v in msg.__dict__.items() if k != "_object_id"})
    out.__dict__["_content"] = content
    return out


def message_bytes(msg: Message, hashed: bool = True) -> int:
    """Bytes of the object tree Flower serializes for this message's content (wire bytes): the
    sum of ``len(deflate())`` over the unique objects of the tree, as Flower 1.41's
    ``get_all_nested_objects`` collects them (identical chunks travel once). The walk takes
    each object's id from its parent's ``children``; an Array's chunk ids are hashed once,
    straight from its data (:func:`_prime_chunks`), and a chunk's size is its head plus its
    data, so a payload is neither copied nor hashed again (``get_all_nested_objects``
    re-deflates and re-hashes every chunk: half the server's aggregation time for large
    uploads). ``hashed=False``, for a received message (whose chunk ids nobody will need): a
    message of one chunk is counted without hashing it (:func:`_stand_in`: the same bytes,
    tested against Flower's own tree), and the message is left as it was; a message about to
    be sent is hashed, so that Flower's push finds its chunks primed."""
    memo: dict = {}
    if not hashed:
        msg = _stand_in(msg, memo)
    seen: set[str] = set()
    total = 0
    for record in msg.content.array_records.values():  # before any parent's id needs them
        for arr in record.values():
            _prime_chunks(arr, memo)

    def walk(obj) -> None:
        nonlocal total
        if isinstance(obj, ArrayChunk):  # head states len(data), the body is its bytes
            total += len(_chunk_head(len(obj.data))) + memoryview(obj.data).nbytes
            return
        for cid, child in (obj.children or {}).items():
            if cid not in seen:
                seen.add(cid)
                walk(child)
        total += len(obj.deflate())

    walk(msg)
    return total
