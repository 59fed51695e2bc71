"""Fuzz the decoders: any byte string must decode to finite float32 arrays or raise CodecError.

Thousands of cases, seeded and derandomized: truncations at every offset and single-byte mutations
of valid payloads of many specs, random bytes, header-field corruption, hand-made hostile bodies and
absurd declared sizes. A CodecError raised by the decoder's last-resort wrapper ("unexpected decoder
failure") counts as a failure too: every rejection must come from an explicit check.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.compression import CodecError, decode_payload, parse_spec
from fedlora.compression.binary import uvarint
from fedlora.compression.payload import MAGIC, _encode_header

MAX_ELEMENTS = 1 << 20
SPECS = ["fp32", "fp16", "bf16", "affine:8", "affine:3", "affine:1", "topk:0.1", "topk:0.6",
         "topk:0.2:tensor|affine:4", "ranks", "ranks|affine:2", "topk:0.1|affine:4|zstd", "zstd",
         "ranks|bf16|zstd:1", "sign", "topk:0.1|sign|zstd", "ranks|sign", "sign:tensor",
         "lowrank:1", "lowrank:2|affine:4|zstd", "lowrank:1|sign"]


def tensors(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    a[1] = 0.0
    b = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    b[:, 1] = 0.0
    return {"l.lora_A": a, "l.lora_B": b, "bias": rng.standard_normal(3).astype(np.float32),
            "w": (rng.standard_normal((3, 40)) * 10).astype(np.float32)}


VALID = {s: parse_spec(s).encode(tensors()) for s in SPECS}


def check(payload, **kw) -> str:
    """Decode; return "ok" or "error". Anything but CodecError propagates and fails the test."""
    try:
        out = decode_payload(payload, max_elements=kw.get("max_elements", MAX_ELEMENTS),
                             expected=kw.get("expected"))
    except CodecError as err:
        assert not str(err).startswith("unexpected decoder failure"), str(err)
        return "error"
    for v in out.values():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32
        assert np.isfinite(v).all()
    return "ok"


def test_valid_payloads_decode():
    for spec, p in VALID.items():
        assert check(p) == "ok", spec


@pytest.mark.parametrize("spec", SPECS)
def test_every_truncation_is_rejected(spec):
    p = VALID[spec]
    for cut in range(len(p)):
        assert check(p[:cut]) == "error", (spec, cut)


@pytest.mark.parametrize("spec", SPECS)
def test_single_byte_mutations(spec):
    p = VALID[spec]
    outcomes = {"ok": 0, "error": 0}
    for pos in range(len(p)):
        for new in {p[pos] ^ 0x01, p[pos] ^ 0x80, 0x00, 0xFF, (p[pos] + 1) & 0xFF}:
            if new == p[pos]:
                continue
            outcomes[check(p[:pos] + bytes([new]) + p[pos + 1:])] += 1
    assert outcomes["error"] > 0


def test_trailing_garbage_and_appended_bytes():
    for spec, p in VALID.items():
        for extra in (b"\x00", b"\xff" * 7, p):
            assert check(p + extra) == "error", spec


def test_random_bytes():
    rng = np.random.default_rng(1234)
    prefixes = [b"", MAGIC, MAGIC + b"\x01"] + [p[:n] for p in VALID.values() for n in (8, 20)]
    count = 0
    for i in range(3000):
        pre = prefixes[i % len(prefixes)]
        body = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
        check(pre + body)
        count += 1
    assert count == 3000


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=st.sampled_from(SPECS), edits=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 10_000))
def test_multi_byte_corruption(spec, edits, cut):
    p = bytearray(VALID[spec])
    for pos, val in edits:
        p[pos % len(p)] = val
    check(bytes(p))
    check(bytes(p[: cut % (len(p) + 1)]))


# ------------------------------------------------------------------------------------------
# hand-made headers and bodies


def payload(spec, table, body=b""):
    return _encode_header(spec, table) + body


def f32(*v):
    return np.array(v, "<f4").tobytes()


@pytest.mark.parametrize("bad,why", [
    (b"XYZ\x01", "magic"), (MAGIC + b"\x03", "version"), (MAGIC + b"\x00", "version"),
    (MAGIC + b"\x01" + uvarint(3) + b"lz4" + uvarint(0), "unknown codec"),
    (MAGIC + b"\x01" + uvarint(8) + b"affine:9" + uvarint(0), "1..8"),
    (MAGIC + b"\x01" + uvarint(8) + b"fp32|zst" + uvarint(0), "unknown codec"),
    (MAGIC + b"\x01" + uvarint(9) + b"topk:5e-2" + uvarint(0), "canonical"),
    (MAGIC + b"\x01" + uvarint(4) + b"\xff\xfe32" + uvarint(0), "(?i)utf-8"),
    (MAGIC + b"\x01" + uvarint(10 ** 6) + b"fp32", "spec length"),
    (MAGIC + b"\x01" + uvarint(4) + b"fp32" + b"\xff" * 12, "varint"),
    (MAGIC + b"\x01" + uvarint(4) + b"fp32" + b"\x80\x00", "canonical"),
    (MAGIC + b"\x01" + uvarint(4) + b"fp32" + uvarint(2 ** 40), "tensor count"),
])
def test_header_corruption(bad, why):
    with pytest.raises(CodecError, match=why):
        decode_payload(bad)


def test_absurd_declared_sizes_rejected_before_allocating():
    huge = [("x", (2 ** 40,)), ("x", (2 ** 20, 2 ** 20)), ("x", (2 ** 62, 0)),
            ("x", (1,) * 33)]
    for spec in ["fp32", "topk:0.5", "affine:8", "ranks", "zstd"]:
        for entry in huge:
            t0 = time.perf_counter()
            with pytest.raises(CodecError):
                decode_payload(payload(spec, [entry], b"\x00" * 64))
            assert time.perf_counter() - t0 < 0.5
    # within max_elements but the body is missing: rejected without allocating the dense output,
    # with the expected shapes (the body is read) and without (the header outgrows the payload)
    with pytest.raises(CodecError, match="truncated"):
        decode_payload(payload("fp32", [("x", (2 ** 26,))]), max_elements=2 ** 27,
                       expected={"x": (2 ** 26,)})
    with pytest.raises(CodecError, match="pass the expected shapes"):
        decode_payload(payload("fp32", [("x", (2 ** 26,))]), max_elements=2 ** 27)
    # many tensors each under the cap, together over it
    table = [(f"t{i}", (2 ** 19,)) for i in range(8)]
    with pytest.raises(CodecError, match="max_elements"):
        decode_payload(payload("fp32", table), max_elements=2 ** 21)
    # duplicate names
    with pytest.raises(CodecError, match="duplicate"):
        decode_payload(payload("fp32", [("a", (1,)), ("a", (1,))], f32(1, 2)))


@pytest.mark.parametrize("spec,table,body,why", [
    ("fp32", [("x", (2,))], f32(1, np.nan), "NaN or Inf"),
    ("fp32", [("x", (2,))], f32(1, np.inf), "NaN or Inf"),
    ("fp16", [("x", (2,))], np.array([1, np.inf], "<f2").tobytes(), "NaN or Inf"),
    ("bf16", [("x", (1,))], b"\xc0\x7f", "NaN or Inf"),
    ("affine:8", [("x", (1, 2))], b"\x01" + f32(np.nan) + b"\x00" + b"\x00\x01", "scale"),
    ("affine:8", [("x", (1, 2))], b"\x01" + f32(0.0) + b"\x00" + b"\x00\x01", "scale"),
    ("affine:8", [("x", (1, 2))], b"\x01" + f32(-1.0) + b"\x00" + b"\x00\x01", "scale"),
    ("affine:8", [("x", (1, 2))], b"\x01" + f32(np.inf) + b"\x00" + b"\x00\x01", "scale"),
    ("affine:8", [("x", (1, 2))], b"\x01" + f32(3e38) + b"\x80" + b"\x00\x01", "overflow"),
    ("affine:8", [("x", (1, 2))], b"\x03" + f32(1.0) + b"\x00" * 3 + b"\x00\x01", "width"),
    ("affine:2", [("x", (1, 3))], b"\x01" + f32(1.0) + b"\x00" + b"\xff", "padding"),
    ("affine:4", [("x", (1, 2))], b"\x01" + f32(1.0) + b"\x00", "truncated"),
    ("sign", [("x", (1, 2))], f32(-1.0) + b"\x00", "negative or non-finite sign scale"),
    ("sign", [("x", (3,))], f32(-1.0) + b"\x00", "negative or non-finite sign scale"),
    ("sign", [("x", (1, 2))], f32(np.nan) + b"\x00", "negative or non-finite sign scale"),
    ("sign", [("x", (1, 2))], f32(np.inf) + b"\x00", "negative or non-finite sign scale"),
    ("sign", [("x", (1, 3))], f32(1.0) + b"\x08", "padding"),
    ("sign", [("x", (1, 2))], f32(-0.0) + b"\x00", "negative or non-finite sign scale"),
    ("sign", [("x", (1, 2))], f32(0.0) + b"\x01", "slice of scale 0"),
    ("sign", [("x", (2, 3))], f32(1.0), "truncated"),
    # gap varints (2 of 64 kept: the gap section beats the 8-byte bitmap)
    ("topk:0.03125", [("x", (64,))], uvarint(2) + b"\x01" + uvarint(2) + b"\x28\x28" + f32(1, 2),
     "index 81 out of range"),
    ("topk:0.03125", [("x", (64,))], uvarint(2) + b"\x01" + uvarint(2) + b"\x01\x7f" + f32(1, 2),
     "out of range"),
    ("topk:0.03125", [("x", (64,))], uvarint(2) + b"\x01" + uvarint(3) + b"\x00\x00\x00"
     + f32(1, 2), "varints"),
    ("topk:0.03125", [("x", (64,))], uvarint(2) + b"\x01" + uvarint(3) + b"\x80\x80\x00"
     + f32(1, 2), "varints"),
    ("topk:0.03125", [("x", (64,))], uvarint(2) + b"\x01" + uvarint(2) + b"\x00\x80" + f32(1, 2),
     "varint"),
    ("topk:0.03125", [("x", (64,))], uvarint(2) + b"\x01" + uvarint(3) + b"\x80\x00\x05"
     + f32(1, 2), "canonical"),
    # a gap section that is not smaller than the bitmap: the encoder never writes one
    ("topk:0.5", [("x", (4,))], uvarint(2) + b"\x01" + uvarint(2) + b"\x00\x00" + f32(1, 2),
     "not smaller than its 1-byte bitmap"),
    ("topk:0.5", [("x", (4,))], uvarint(2) + b"\x00" + b"\x07" + f32(1, 2), "bitmap"),
    ("topk:0.5", [("x", (4,))], uvarint(2) + b"\x00" + b"\x13" + f32(1, 2), "padding"),
    ("topk:0.5", [("x", (4,))], uvarint(2) + b"\x02" + b"\x03" + f32(1, 2), "index mode"),
    ("topk:0.5", [("x", (4,))], uvarint(3) + b"\x00" + b"\x07" + f32(1, 2, 3), "k="),
    ("topk:0.5", [("x", (4,))], uvarint(1) + b"\x00" + b"\x01" + f32(1), "keeps"),
    ("topk:0.5:tensor", [("x", (4,))], uvarint(1) + b"\x00" + b"\x01" + f32(1), "keeps"),
    ("topk:0.5", [("x", (4,))], uvarint(9) + b"\x00", "kept count"),
    ("ranks", [("a.lora_A", (3, 2))], b"\x0d" + f32(1, 2, 3, 4), "padding"),
    ("ranks", [("a.lora_B", (2, 3))], b"\x03" + f32(1, 2, 3), "truncated"),
    ("fp32", [("x", (1,))], f32(1) + b"\x00", "trailing"),
])
def test_hostile_bodies(spec, table, body, why):
    with pytest.raises(CodecError, match=why):
        decode_payload(payload(spec, table, body))


def test_zstd_layer_attacks():
    import zstandard

    table = [("x", (4,))]
    raw = f32(1, 2, 3, 4)
    frame = zstandard.ZstdCompressor().compress(raw)
    assert check(payload("zstd", table, uvarint(16) + frame)) == "ok"
    cases = {
        "exceeds": uvarint(10 ** 9) + frame,                       # declared size over the bound
        "declares": uvarint(15) + frame,                           # frame content size mismatch
        "trailing": uvarint(16) + frame + b"junk",
        "frame header": uvarint(16) + b"\x00\x01",
        "truncated": uvarint(16) + frame[:-3],
    }
    for why, body in cases.items():
        with pytest.raises(CodecError, match=why):
            decode_payload(payload("zstd", table, body))
    # a small frame that inflates far beyond the declared shapes (zip bomb) is refused up front
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (64 << 20))
    t0 = time.perf_counter()
    with pytest.raises(CodecError):
        decode_payload(payload("zstd", table, uvarint(64 << 20) + bomb))
    # a frame without a content size
    cobj = zstandard.ZstdCompressor(write_content_size=False)
    with pytest.raises(CodecError):
        decode_payload(payload("zstd", table, uvarint(16) + cobj.compress(raw)))
    assert time.perf_counter() - t0 < 1.0


def test_expected_shapes_on_fuzzed_input():
    want = {k: v.shape for k, v in tensors().items()}
    p = VALID["affine:8"]
    assert check(p, expected=want) == "ok"
    for pos in range(len(p)):
        check(p[:pos] + bytes([p[pos] ^ 0x04]) + p[pos + 1:], expected=want)


@pytest.mark.parametrize("bad", [None, "FLC\x01", 7, [1, 2], b"", bytearray(b"FLC")])
def test_non_bytes_and_empty_inputs(bad):
    with pytest.raises(CodecError):
        decode_payload(bad)
    with pytest.raises(CodecError):
        parse_spec("fp32").decode(bad)


FLAT_SPECS = ["topk:0.1", "topk:0.6", "topk:0.2:tensor", "topk:0.05|zstd", "topk:1.0",
              "topk:0.1|affine:4", "topk:0.6|affine:3", "topk:0.2:tensor|affine:8",
              "topk:1.0|affine:1"]


def _outcome(read, payload, shapes, flat, flat_kind):
    """("ok", {name: dense values}) or ("error", message) of ``read`` (a Pipeline's
    sparse_sections or sections); with ``flat`` its answer must be a ``flat_kind``."""
    try:
        out = read(payload, shapes, flat=flat)
    except CodecError as err:
        assert not str(err).startswith("unexpected decoder failure"), str(err)
        return "error", str(err)
    if flat:
        assert type(out).__name__ == flat_kind
        out = out.sections()
    return "ok", {k: out[k].values(shapes[k]).tobytes() for k in shapes}


def _mutants(p: bytes, *extra: int) -> list[bytes]:
    """Every truncation of ``p``, two with trailing bytes, and every single-byte mutation
    (low / high bit flipped, 0x00, 0xFF, + 1, and ``extra`` values)."""
    cases = [p[:cut] for cut in range(len(p))] + [p + b"\x00", p + p[-5:]]
    for pos in range(len(p)):
        for new in {p[pos] ^ 0x01, p[pos] ^ 0x80, 0x00, 0xFF, (p[pos] + 1) & 0xFF, *extra}:
            if new != p[pos]:
                cases.append(p[:pos] + bytes([new]) + p[pos + 1:])
    return cases


def _same_verdicts(outcome, pipe, cases, shapes) -> None:
    """The compiled reader (flat) and the Python one agree on every case; both verdicts occur."""
    verdicts = {"ok": 0, "error": 0}
    for case in cases:
        fast = outcome(pipe, case, shapes, True)
        assert fast == outcome(pipe, case, shapes, False)
        verdicts[fast[0]] += 1
    assert verdicts["error"] > 0 and verdicts["ok"] > 0


def _sparse_outcome(pipe, payload, shapes, flat):
    return _outcome(pipe.sparse_sections, payload, shapes, flat, "FlatSparse")


@pytest.mark.parametrize("spec", FLAT_SPECS)
def test_the_compiled_topk_reader_accepts_exactly_what_read_sparse_accepts(spec, monkeypatch):
    """The compiled reader of whole topk bodies (TopK.read_flat; fp32 and affine values)
    against the Python reader (read_sparse) on a valid payload with bitmap and gap tensors,
    every truncation and every single-byte mutation of it: the same verdict, the same error
    message (a refused body is read again by read_sparse), the same values where both accept;
    trailing bytes too.
    The valid payload is read by the compiled pass alone (read_sparse not called), so the test
    covers it."""
    from fedlora.compression.sparsify import TopK

    rng = np.random.default_rng(5)
    t = dict(tensors(1))
    t["big"] = rng.standard_normal((40, 25)).astype(np.float32)  # gap varints at 0.05 / 0.1
    shapes = {k: v.shape for k, v in t.items()}
    pipe = parse_spec(spec)
    p = pipe.encode(t)
    slow_calls = []
    real = TopK.read_sparse
    monkeypatch.setattr(TopK, "read_sparse", lambda *a: slow_calls.append(1) or real(*a))
    assert _sparse_outcome(pipe, p, shapes, True) == _sparse_outcome(pipe, p, shapes, False)
    assert _sparse_outcome(pipe, p, shapes, True)[0] == "ok" and len(slow_calls) == 1
    cases = _mutants(p)
    for pos in range(len(p)):  # a set bit moved within its byte (bitmaps: onto padding bits)
        for a in range(8):
            for b in range(a + 1, 8):
                if (p[pos] >> a & 1) != (p[pos] >> b & 1):
                    cases.append(p[:pos] + bytes([p[pos] ^ (1 << a | 1 << b)]) + p[pos + 1:])
    _same_verdicts(_sparse_outcome, pipe, cases, shapes)


def _dense_outcome(pipe, payload, shapes, flat):
    return _outcome(pipe.sections, payload, shapes, flat, "FlatDense")


@pytest.mark.parametrize("spec", ["affine:4", "affine:3", "affine:8", "fp32"])
def test_the_compiled_dense_reader_accepts_exactly_what_read_section_accepts(spec, monkeypatch):
    """The compiled reader of whole dense affine / fp32 bodies (ValueCoder.read_flat) against
    the Python reader (read_section, tensor by tensor) on a valid payload with 1-, 2- and
    4-byte zero-points, raw 1-D tensors and padding bits, every truncation and every
    single-byte mutation of it (scales made 0, negative, NaN, Inf, overflowing; widths; padding
    bits set), trailing bytes too: the same verdict, the same error message (a refused body is
    read again by read_section), the same values where both accept. The valid payload is read
    by the compiled pass alone (read_section not called), so the test covers it."""
    from fedlora.compression import quantize
    from fedlora.compression.quantize import Fp32

    rng = np.random.default_rng(7)
    t = dict(tensors(2))
    for name, start in (("z2", 100.0), ("z4", 1e4)):  # 2- and 4-byte zero-points (3-8 bits)
        t[name] = np.stack([np.linspace(start, start + 1, 7),
                            np.linspace(-1, 1, 7)]).astype(np.float32)
    t["odd"] = rng.standard_normal((3, 5)).astype(np.float32)  # 15 fields: padding bits
    shapes = {k: v.shape for k, v in t.items()}
    pipe = parse_spec(spec)
    p = pipe.encode(t)
    slow_calls = []
    for cls in (quantize.Affine, Fp32):
        real = cls.read_section
        monkeypatch.setattr(cls, "read_section",
                            lambda *a, _real=real: slow_calls.append(1) or _real(*a))
    assert _dense_outcome(pipe, p, shapes, True)[0] == "ok" and not slow_calls
    assert _dense_outcome(pipe, p, shapes, True) == _dense_outcome(pipe, p, shapes, False)
    _same_verdicts(_dense_outcome, pipe, _mutants(p, 0x7F), shapes)


@pytest.mark.parametrize("spec", ["affine:3", "fp32"])
def test_flat_sections_from_the_python_reader_are_the_compiled_readers(spec):
    """FlatDense.of (what Pipeline.sections(flat=True) returns if the compiled pass refused a
    body the Python reader accepts) holds the same offsets, scales and zero offsets as the
    compiled pass, so the sum it feeds is the same."""
    from fedlora.compression.binary import Reader
    from fedlora.compression.quantize import FlatDense
    from fedlora.compression.payload import _open

    t = dict(tensors(4))
    shapes = {k: v.shape for k, v in t.items()}
    pipe = parse_spec(spec)
    p = pipe.encode(t, by_digest=False)
    fast = pipe.sections(p, shapes, flat=True)
    _, table, r = _open(p, shapes, 1 << 30, pipe)
    assert isinstance(r, Reader)
    names = [name for name, _ in table]
    slow = FlatDense.of(names, pipe.sections(p, shapes), np.frombuffer(r.buf, np.uint8))
    assert slow.names == fast.names == names
    for a in ("ns", "groups", "offs", "S", "ZU"):
        assert np.array_equal(getattr(slow, a), getattr(fast, a)), a
    gofs = fast.groups > 0  # (a raw tensor's group offset is never read)
    assert np.array_equal(slow.gofs[gofs], fast.gofs[gofs])


def test_the_compiled_topk_reader_refuses_gaps_no_smaller_than_the_bitmap(monkeypatch):
    """A gap-varint index section that is not smaller than the tensor's bitmap (an encoder
    never sends one) is refused by both readers, with read_sparse's message."""
    from fedlora.compression import sparsify

    t = {"w": np.arange(1, 81, dtype=np.float32).reshape(4, 20)}
    shapes = {"w": (4, 20)}
    pipe = parse_spec("topk:0.5")

    def gaps_always(idx, n):
        enc = sparsify.leb128_encode(sparsify.gaps_of(idx))
        return 1, sparsify.uvarint_len(enc.size) + enc.size, enc

    monkeypatch.setattr(sparsify, "_index_choice", gaps_always)
    bad = pipe.encode(t)  # keeps 40 of 80: 41 bytes of gaps against a 10-byte bitmap
    fast, slow = (_sparse_outcome(pipe, bad, shapes, f) for f in (True, False))
    assert fast == slow and fast[0] == "error" and "not smaller than" in fast[1]


# ------------------------------------------------------------------------------------------
# drive / eden:b (rotated, keyed by the codec key both ends derive): the same hardening, the
# payloads decoded with their key; a wrong key is refused by the body's tag

KEYED = ["drive", "drive:mse|zstd", "eden:0.5", "eden:2:mse", "eden:0.25|zstd", "eden:3",
         "drive:mse:tensor", "eden:0.5:mse:tensor|zstd"]
FUZZ_KEY = 0xFEED


def keyed_tensors():
    return {k: v for k, v in tensors().items() if k != "l.lora_B"}  # 147 values: 3 chunks


KEYED_VALID = {s: parse_spec(s).keyed(FUZZ_KEY).encode(keyed_tensors()) for s in KEYED}
KEYED_SHAPES = {k: v.shape for k, v in keyed_tensors().items()}


def check_keyed(payload, key=FUZZ_KEY, expected=None) -> str:
    try:
        out = decode_payload(payload, max_elements=MAX_ELEMENTS, expected=expected, key=key)
    except CodecError as err:
        assert not str(err).startswith("unexpected decoder failure"), str(err)
        return "error"
    for v in out.values():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32
        assert np.isfinite(v).all()
    return "ok"


@pytest.mark.parametrize("spec", KEYED)
def test_keyed_truncations_mutations_and_wrong_keys(spec):
    p = KEYED_VALID[spec]
    assert check_keyed(p) == "ok" and check_keyed(p, expected=KEYED_SHAPES) == "ok"
    for cut in range(len(p)):
        assert check_keyed(p[:cut]) == "error", (spec, cut)
    assert check_keyed(p + b"\x00") == "error"
    outcomes = {"ok": 0, "error": 0}
    for pos in range(len(p)):
        for new in {p[pos] ^ 0x01, p[pos] ^ 0x80, 0x00, 0xFF}:
            if new != p[pos]:
                outcomes[check_keyed(p[:pos] + bytes([new]) + p[pos + 1:])] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0  # label bits: any value is legitimate
    for key in (FUZZ_KEY + 1, 0, None):
        with pytest.raises(CodecError, match="codec key tag|needs the codec key"):
            decode_payload(p, key=key)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=st.sampled_from(KEYED), edits=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 10_000))
def test_keyed_multi_byte_corruption(spec, edits, cut):
    p = bytearray(KEYED_VALID[spec])
    for pos, val in edits:
        p[pos % len(p)] = val
    check_keyed(bytes(p))
    check_keyed(bytes(p[: cut % (len(p) + 1)]))


def _tag(key=FUZZ_KEY):
    from fedlora.compression import rotate
    return np.array([rotate.key_tag(key)], "<u4").tobytes()


@pytest.mark.parametrize("spec,n,body,why", [
    # 16 values: one chunk of 16 -> 4-byte scale + 2 label bytes (1 bit) / 4 (2 bits)
    ("drive", 16, f32(np.nan) + b"\x00\x00", "chunk scale"),
    ("drive", 16, f32(-1.0) + b"\x00\x00", "chunk scale"),
    ("drive", 16, f32(-0.0) + b"\x00\x00", "chunk scale"),
    ("drive", 16, f32(np.inf) + b"\x00\x00", "chunk scale"),
    ("drive", 16, f32(3e37) + b"\x00\x00", "chunk scale"),   # x 16 overflows float32
    ("drive", 16, f32(0.0) + b"\x01\x00", "scale 0"),
    ("drive", 16, f32(1.0) + b"\x00", "truncated"),
    ("drive", 2, f32(1.0) + b"\x80", "padding"),  # a chunk of 2 values: 6 unused bits
    ("drive", 12, f32(1.0) + b"\x00\x00\x00", "trailing"),  # 12 values pad to 16: 2 bytes
    ("eden:2", 4, f32(1.0), "truncated"),
    ("eden:0.5", 16, f32(1.0) + b"\x00\x00", "trailing"),     # 8 kept: one label byte
    ("drive:tensor", 16, b"\x7f" + f32(1.0) + b"\x00\x00", "chunk scale"),  # 2^127 x 16
    ("drive:tensor", 16, b"\x00" + f32(1.0), "truncated"),
    ("drive:tensor", 16, b"", "truncated"),
])
def test_keyed_hostile_bodies(spec, n, body, why):
    with pytest.raises(CodecError, match=why):
        decode_payload(payload(spec, [("x", (n,))], _tag() + body), key=FUZZ_KEY)


def test_keyed_absurd_declared_sizes_rejected_before_allocating():
    for spec in ("drive", "eden:0.25", "eden:4"):
        for entry in [("x", (2 ** 40,)), ("x", (2 ** 20, 2 ** 20)), ("x", (1,) * 33)]:
            with pytest.raises(CodecError):
                decode_payload(payload(spec, [entry], _tag() + b"\x00" * 64), key=FUZZ_KEY)
        t0 = time.perf_counter()
        with pytest.raises(CodecError, match="truncated"):
            decode_payload(payload(spec, [("x", (2 ** 26,))], _tag()), max_elements=2 ** 27,
                           expected={"x": (2 ** 26,)}, key=FUZZ_KEY)
        with pytest.raises(CodecError, match="pass the expected shapes"):
            decode_payload(payload(spec, [("x", (2 ** 26,))], _tag()), max_elements=2 ** 27,
                           key=FUZZ_KEY)
        assert time.perf_counter() - t0 < 0.5
