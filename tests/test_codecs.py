"""Property tests of the codec library (fedlora.compression)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlora.compression import (
    CodecError,
    ErrorFeedback,
    Pipeline,
    SpecError,
    decode_payload,
    parse_spec,
    topk_mask,
)
from fedlora.compression import arrays as compression_arrays
from fedlora.compression import casts, payload, quantize
from fedlora.compression.payload import _encode_header as payload_header
from fedlora.compression.binary import (Reader, leb128_decode, leb128_encode, leb128_size,
                                        pack_bits, unpack_bits, uvarint, uvarint_len)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
TINY = float(np.finfo(np.float32).tiny)
F32 = st.floats(min_value=-2.0 ** 100, max_value=2.0 ** 100, allow_nan=False, allow_infinity=False,
                width=32, allow_subnormal=True)


def arrays(shape, elements=F32):
    return hnp.arrays(np.float32, shape, elements=elements)


def shapes(min_dims=2, max_dims=4, max_side=9):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side)


def roundtrip(spec, tensors):
    pipe = parse_spec(spec)
    payload = pipe.encode(tensors)
    out = decode_payload(payload, expected={k: np.shape(v) for k, v in tensors.items()})
    assert list(out) == list(tensors)
    for k, v in out.items():
        assert v.dtype == np.float32 and v.shape == np.shape(tensors[k])
        assert np.isfinite(v).all()
    return payload, out


def header_len(spec, table):
    return payload._header_size(parse_spec(spec).spec, table)


# ------------------------------------------------------------------------------------------
# affine


def affine_tol(x2: np.ndarray, bits: int) -> np.ndarray:
    """Per-slice bound: (max-min)/(qmax-qmin)/2 plus float32 rounding (a few ulps of max|x|)."""
    x64 = x2.astype(np.float64)
    mn, mx = x64.min(axis=1), x64.max(axis=1)
    scale = (mx - mn) / ((1 << bits) - 1)
    amax = np.maximum(np.abs(mn), np.abs(mx))
    return 0.5 * np.maximum(scale, TINY) + 2e-6 * amax + TINY


@SETTINGS
@given(x=shapes().flatmap(arrays), bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]))
@example(x=np.array([[-1.0, -0.5, 0.0, 0.5, 1.0]], np.float32), bits=1)
@example(x=np.array([[0.0, 0.1, 0.2, 0.3, 1.0], [2.0, 2.5, 3.0, 3.5, 4.0]], np.float32), bits=2)
@example(x=np.array([[1000.0, 1000.5, 1001.0]], np.float32), bits=8)
@example(x=np.array([[1.0, np.nextafter(np.float32(1), np.float32(2))]], np.float32), bits=8)
@example(x=np.array([[-3e38, 3e38 / 2]], np.float32), bits=4)
def test_affine_error_within_half_scale(x, bits):
    _, out = roundtrip(f"affine:{bits}", {"w": x})
    x2 = x.reshape(x.shape[0], -1)
    err = np.abs(out["w"].reshape(x2.shape).astype(np.float64) - x2)
    assert (err.max(axis=1) <= affine_tol(x2, bits)).all()
    # it really quantizes: at most 2^b distinct values per slice
    for row in out["w"].reshape(x2.shape):
        assert np.unique(row).size <= 2 ** bits


@SETTINGS
@given(g=st.integers(1, 5), m=st.integers(2, 30), bits=st.sampled_from([1, 2, 4, 8]),
       seed=st.integers(0, 2 ** 31))
def test_affine_grid_ties_and_range_ends(g, m, bits, seed):
    """Values exactly on grid midpoints and at both ends of the range (rounding ties, clamping)."""
    rng = np.random.default_rng(seed)
    levels = (1 << bits) - 1
    lo = rng.uniform(-2, 1, g)[:, None]
    s = rng.uniform(0.01, 1, g)[:, None]
    k = rng.integers(0, levels + 1, (g, m)) + rng.choice([0.0, 0.5, -0.5], (g, m))
    k = np.clip(k, 0, levels)
    k[:, 0], k[:, -1] = 0, levels
    x = (lo + s * k).astype(np.float32)
    _, out = roundtrip(f"affine:{bits}", {"w": x})
    err = np.abs(out["w"].astype(np.float64) - x).max(axis=1)
    assert (err <= affine_tol(x, bits)).all()


@SETTINGS
@given(consts=st.lists(st.one_of(st.just(0.0), st.just(-0.0), F32), min_size=1, max_size=6),
       m=st.integers(1, 20), bits=st.integers(1, 8), mixed=st.booleans())
@example(consts=[0.0], m=16, bits=4, mixed=False)
@example(consts=[1e-45, -1e-45, 3e38, -3e38], m=3, bits=8, mixed=True)
def test_affine_constant_slices_exact(consts, m, bits, mixed):
    x = np.repeat(np.array(consts, np.float32)[:, None], m, axis=1)
    if mixed:  # non-constant neighbours must not disturb the constant slices
        x = np.concatenate([x, np.linspace(-1, 1, m, dtype=np.float32)[None]], axis=0)
    with np.errstate(invalid="raise", divide="raise", over="raise"):
        _, out = roundtrip(f"affine:{bits}", {"lora_B": x})
    np.testing.assert_array_equal(out["lora_B"][: len(consts)], x[: len(consts)])


def test_affine_layout_per_slice_and_1d_raw():
    """conv lora_A [r,Cin,k,k] -> r scale/zero pairs; 1-D tensors stay raw fp32; sizes exact."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(7).astype(np.float32)
    t = {"conv.lora_A": a, "norm.bias": bias}
    payload, out = roundtrip("affine:4", t)
    n = a.size
    body = (1 + 4 * (4 + 1) + math.ceil(n * 4 / 8)) + 4 * bias.size
    table = [("conv.lora_A", a.shape), ("norm.bias", (7,))]
    assert len(payload) == header_len("affine:4", table) + body
    assert out["norm.bias"].tobytes() == bias.tobytes()


@SETTINGS
@given(x=shapes(2, 2, 40).flatmap(arrays), bits=st.integers(1, 8), offset=st.sampled_from(
    [0.0, 1.0, 1e3, 1e7]), engine=st.sampled_from(["numpy", "torch", "numba"]))
def test_quantizer_matches_reference_formula(x, bits, offset, engine):
    """The fast kernels (magic-number rounding, clamp skipped on slices that cannot need it) give
    exactly u = clamp(rint(fl32(x * fl32(1/s)) + z - qmin), 0, 2^b - 1) on non-constant slices."""
    x = (x + np.float32(offset)).astype(np.float32)
    old = quantize.ENGINE
    quantize.ENGINE = engine
    try:
        s, z, u = quantize.quantize_groups(x, bits)
    finally:
        quantize.ENGINE = old
    qmin = -(1 << (bits - 1))
    inv = (np.float32(1) / s).astype(np.float32)
    p = (x * inv[:, None]).astype(np.float64)
    ref = np.clip(np.rint(p + (z - qmin)[:, None]), 0, 2 ** bits - 1)
    const = x.min(axis=1) == x.max(axis=1)
    got = u[: x.size].reshape(x.shape)
    np.testing.assert_array_equal(got[~const], ref[~const])


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001])
def test_bit_packing_density(bits, n):
    """b-bit values of one slice use ceil(n*b/8) body bytes after 1 + 4 + zw parameter bytes."""
    x = np.linspace(-1, 1, n, dtype=np.float32).reshape(1, n)  # n == 1: a constant slice
    spec = f"affine:{bits}"
    payload = parse_spec(spec).encode({"w": x})
    hdr = header_len(spec, [("w", (1, n))])
    zw = payload[hdr]
    assert zw == 1
    assert len(payload) - hdr == 1 + 4 + zw + math.ceil(n * bits / 8)


@SETTINGS
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_unpack_roundtrip(bits, data):
    u = data.draw(hnp.arrays(np.uint8, st.integers(0, 100), elements=st.integers(0, 2 ** bits - 1)))
    p = pack_bits(u, bits)
    assert p.size == math.ceil(u.size * bits / 8)
    np.testing.assert_array_equal(unpack_bits(p, u.size, bits), u)


def test_affine_zero_point_is_integer_and_compact():
    x = np.array([[-1.0, 0.3, 2.0], [5.0, 6.0, 7.0]], np.float32)
    s, z = quantize.affine_params(x.min(axis=1), x.max(axis=1), 8)
    assert z.dtype == np.int64 and np.all(z == np.round(z))
    np.testing.assert_allclose(s, (x.max(axis=1) - x.min(axis=1)) / 255, rtol=1e-6)
    payload = parse_spec("affine:8").encode({"w": x[:1]})
    assert payload[header_len("affine:8", [("w", (1, 3))])] == 1  # int8 zero-point


# ------------------------------------------------------------------------------------------
# top-k


def reference_topk(flats, k):
    """k largest |x| over the concatenation; ties -> lower global position."""
    a = np.abs(np.concatenate(flats).astype(np.float64))
    order = np.lexsort((np.arange(a.size), -a))[:k]
    keep = np.zeros(a.size, bool)
    keep[order] = True
    out, off = [], 0
    for f in flats:
        out.append(keep[off:off + f.size])
        off += f.size
    return out


tied = st.sampled_from([0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 3.0])


@SETTINGS
@given(data=st.data(), d=st.floats(0.01, 1.0), per_tensor=st.booleans(),
       ties=st.booleans())
def test_topk_keeps_exactly_k_largest(data, d, per_tensor, ties):
    elems = tied if ties else F32
    n_t = data.draw(st.integers(1, 4))
    tensors = {f"t{i}": data.draw(arrays(shapes(1, 3, 8), elems)) for i in range(n_t)}
    spec = f"topk:{d!r}" + (":tensor" if per_tensor else "")
    payload, out = roundtrip(spec, tensors)
    flats = [v.reshape(-1) for v in tensors.values()]
    if per_tensor:
        masks = [reference_topk([f], int(math.floor(d * f.size)))[0] for f in flats]
    else:
        masks = reference_topk(flats, int(math.floor(d * sum(f.size for f in flats))))
    got = topk_mask(tensors, d, per_tensor=per_tensor)
    for (name, x), m in zip(tensors.items(), masks):
        assert got[name].reshape(-1).tolist() == m.tolist()
        dec = out[name].reshape(-1)
        np.testing.assert_array_equal(dec[m], x.reshape(-1)[m])  # fp32 values are exact
        assert not dec[~m].any()


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("d", [0.001, 0.05, 0.3])
@pytest.mark.parametrize("kind", ["normal", "ties", "constant", "skewed"])
def test_topk_large_threshold_path_is_exact(per_tensor, d, kind):
    """Tensors above the exact-argsort size use sample thresholds; they must agree exactly."""
    rng = np.random.default_rng(7)
    sizes = [(300, 200), (50000,), (20, 1000)]
    if kind == "normal":
        xs = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    elif kind == "ties":
        xs = [rng.integers(-3, 4, s).astype(np.float32) for s in sizes]
    elif kind == "constant":
        xs = [np.full(s, 0.25, np.float32) for s in sizes]
    else:  # a periodic pattern aligned with the sample stride, so the sample is misleading
        xs = [np.zeros(s, np.float32) for s in sizes]
        for x in xs:
            x.reshape(-1)[::3] = 5.0
    tensors = {f"t{i}": x for i, x in enumerate(xs)}
    flats = [x.reshape(-1) for x in xs]
    if per_tensor:
        masks = [reference_topk([f], int(math.floor(d * f.size)))[0] for f in flats]
    else:
        masks = reference_topk(flats, int(math.floor(d * sum(f.size for f in flats))))
    got = topk_mask(tensors, d, per_tensor=per_tensor)
    for name, m in zip(tensors, masks):
        np.testing.assert_array_equal(got[name].reshape(-1), m)


@pytest.mark.parametrize("nan_at", [None, 300_000, 520_000])
def test_topk_candidates_beyond_their_slot_are_all_kept(monkeypatch, nan_at):
    """A chunk's candidate slot is sized from the values the strided sample saw there; a
    cluster of large values the sample steps over overflows it, and the compiled pass goes on
    after the last one it stored: the selection must still equal the reference, and a NaN on
    either side of the overflow point must still be refused."""
    from fedlora.compression import _sparse_jit

    rng = np.random.default_rng(3)
    n = 600_000  # three chunks; the sample takes positions 4 + 9j
    x = rng.standard_normal(n).astype(np.float32)
    pos = np.arange(262_144, 524_288)
    pos = pos[pos % 9 != 4][:60_000]  # chunk 1, never sampled
    x[pos] = (4.0 + rng.random(pos.size)).astype(np.float32)
    if nan_at is not None:
        x[nan_at] = np.nan
    overflows = []
    real = _sparse_jit.candidates

    def spy(*args):
        got = real(*args)
        overflows.append(got == -2)
        return got

    monkeypatch.setattr(_sparse_jit, "candidates", spy)
    if nan_at is not None:
        with pytest.raises(CodecError, match="NaN or Inf"):
            parse_spec("topk:0.1").encode({"w": x})
        # before the overflow point the pass refuses at once; after it, the pass that goes on
        assert any(overflows) == (nan_at == 520_000)
        return
    got = topk_mask({"w": x}, 0.1)["w"]
    assert any(overflows)  # the slot really overflowed
    np.testing.assert_array_equal(got, reference_topk([x], n // 10)[0])


def test_topk_index_coding_picks_smaller():
    n = 4000
    x = np.arange(1, n + 1, dtype=np.float32).reshape(40, 100)
    for d, want_mode in [(0.5, 0), (0.01, 1), (0.2, 0), (0.05, 1)]:
        spec = f"topk:{d}"
        payload = parse_spec(spec).encode({"w": x})
        hdr = header_len(spec, [("w", x.shape)])
        k = int(math.floor(d * n))
        assert payload[hdr:hdr + uvarint_len(k)] == uvarint(k)
        mode = payload[hdr + uvarint_len(k)]
        idx = np.sort(np.argsort(-x.reshape(-1), kind="stable")[:k])
        gaps = np.diff(idx, prepend=-1) - 1
        bitmap = math.ceil(n / 8)
        varint = uvarint_len(leb128_size(gaps)) + leb128_size(gaps)
        assert mode == (1 if varint < bitmap else 0) == want_mode
        index_bytes = len(payload) - hdr - uvarint_len(k) - 1 - 4 * k
        assert index_bytes == min(bitmap, varint)
        assert index_bytes < 8 * k  # never raw int64


VARINT_VALUES = st.one_of(st.integers(0, 2 ** 63 - 1),
                          st.sampled_from([0, 127, 128, 2 ** 14 - 1, 2 ** 14, 2 ** 56 - 1,
                                           2 ** 56, 2 ** 63 - 1]))


@SETTINGS
@given(hnp.arrays(np.int64, st.integers(0, 50), elements=VARINT_VALUES))
def test_leb128_roundtrip(g):
    """The vectorised varints (top-k gaps) write exactly the scalar varints' bytes (header
    fields), for every length from 1 to 9 bytes, and both read them back."""
    enc = leb128_encode(g)
    assert enc.size == leb128_size(g) == sum(uvarint_len(int(v)) for v in g)
    assert enc.tobytes() == b"".join(uvarint(int(v)) for v in g)
    np.testing.assert_array_equal(leb128_decode(enc, g.size, 2 ** 63 - 1, "t"), g)
    r = Reader(enc.tobytes())
    assert [r.uvarint("t", 2 ** 63 - 1) for _ in range(g.size)] == g.tolist()
    r.done()


def scalar_varints(buf: bytes, count: int, limit: int):
    r = Reader(buf)
    vals = [r.uvarint("t", limit) for _ in range(count)]
    r.done()
    return vals


@settings(max_examples=400, deadline=None, derandomize=True)
@given(buf=st.lists(st.one_of(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0x81, 0xFF]),
                              st.integers(0, 255)), max_size=30).map(bytes),
       extra=st.integers(-2, 2), limit=st.sampled_from([0, 1, 300, 2 ** 40, 2 ** 63 - 1]))
def test_scalar_and_vector_varint_decoders_agree(buf, extra, limit):
    """Same bytes, same verdict: the scalar reader (header) and the vectorised decoder (top-k
    gaps) accept exactly the same canonical varints (<= 9 bytes, no redundant zero byte, within
    the limit, nothing left over) with the same values, and reject everything else."""
    count = max(0, sum(b < 0x80 for b in buf) + extra)
    try:
        want = scalar_varints(buf, count, limit)
    except CodecError:
        want = None
    try:
        got = leb128_decode(np.frombuffer(buf, np.uint8), count, limit, "t").tolist()
    except CodecError:
        got = None
    assert got == want


def test_varint_range_is_the_same_for_both_forms():
    """Values must be in [0, 2**63): a 10-byte varint is refused by both readers."""
    for bad in (-1, 2 ** 63):
        with pytest.raises(ValueError):
            uvarint(bad)
    with pytest.raises(ValueError):
        leb128_encode(np.array([3, -1], np.int64))
    ten = b"\x80" * 9 + b"\x01" + b"\x00"  # 2**63, then 0
    with pytest.raises(CodecError, match="longer than 9 bytes"):
        scalar_varints(ten, 2, 2 ** 64)
    with pytest.raises(CodecError, match="longer than 9 bytes"):
        leb128_decode(np.frombuffer(ten, np.uint8), 2, 2 ** 64, "t")


# ------------------------------------------------------------------------------------------
# ranks, casts, lossless


def lora_pair(rng, r=8, d_in=12, d_out=10, zero_ranks=(1, 4, 5)):
    a = rng.standard_normal((r, d_in)).astype(np.float32)
    b = rng.standard_normal((d_out, r, 1, 1)).astype(np.float32)
    a[list(zero_ranks)] = 0.0
    b[:, list(zero_ranks)] = 0.0
    return a, b


def test_ranks_lossless_and_compact():
    rng = np.random.default_rng(3)
    a, b = lora_pair(rng)
    a[2, 3] = -0.0  # -0.0 and subnormals must survive bit-exactly
    a[0, 0] = 1e-45
    norm = rng.standard_normal(10).astype(np.float32)
    t = {"m.lora_A.weight": a, "m.lora_B.weight": b, "m.norm.weight": norm}
    payload, out = roundtrip("ranks", t)
    for k in t:
        assert out[k].tobytes() == t[k].tobytes()
    kept = 8 - 3
    body = 1 + 4 * kept * 12 + 1 + 4 * 10 * kept + 4 * 10
    assert len(payload) == header_len("ranks", [(k, v.shape) for k, v in t.items()]) + body
    # a slice holding a -0.0 is not "all zero": kept, so still bit-identical
    a2 = a.copy()
    a2[1, 0] = -0.0
    _, out2 = roundtrip("ranks", {"x.lora_A": a2})
    assert out2["x.lora_A"].tobytes() == a2.tobytes()


def test_ranks_with_value_coders():
    rng = np.random.default_rng(4)
    a, b = lora_pair(rng, r=6, zero_ranks=(0, 5))
    t = {"l.lora_A": a, "l.lora_B": b}
    _, out = roundtrip("ranks|affine:8", t)
    assert not out["l.lora_A"][[0, 5]].any() and not out["l.lora_B"][:, [0, 5]].any()
    np.testing.assert_allclose(out["l.lora_A"], a, atol=0.02)
    _, out = roundtrip("ranks|fp16", t)
    np.testing.assert_allclose(out["l.lora_B"], b, rtol=1e-3, atol=1e-4)


@SETTINGS
@given(x=shapes(1, 3).flatmap(arrays), spec=st.sampled_from(["fp32", "zstd", "zstd:1",
                                                                  "zstd:19", "fp32|zstd|zstd"]))
def test_lossless_bit_identical(x, spec):
    _, out = roundtrip(spec, {"x": x, "y": -x})
    assert out["x"].tobytes() == x.tobytes() and out["y"].tobytes() == (-x).tobytes()


def bf16_reference(x):
    """Round-to-nearest-even of the float32 bit pattern to its top 16 bits, done in Python ints."""
    out = []
    for u in x.reshape(-1).view(np.uint32).tolist():
        hi, lo = u >> 16, u & 0xFFFF
        if lo > 0x8000 or (lo == 0x8000 and hi & 1):
            hi += 1
        if (hi & 0x7F80) == 0x7F80:
            hi = (hi & 0x8000) | 0x7F7F
        out.append(hi)
    return np.array(out, np.uint32)


@SETTINGS
@given(x=arrays(st.integers(0, 300), st.floats(allow_nan=False, allow_infinity=False, width=32)))
@example(x=np.array([1.00390625, 1.01171875, 3.3961776e38, -3.4e38], np.float32))
def test_bf16_round_to_nearest_even_two_bytes(x):
    payload, out = roundtrip("bf16", {"x": x})
    assert len(payload) == header_len("bf16", [("x", x.shape)]) + 2 * x.size
    np.testing.assert_array_equal(out["x"].view(np.uint32), bf16_reference(x) << 16)


def test_fp16_saturates_and_bf16_large_uses_same_rounding():
    x = np.array([1e6, -1e6, 65519.0, 1.0 / 3.0], np.float32)
    _, out = roundtrip("fp16", {"x": x})
    np.testing.assert_array_equal(out["x"][:3], [65504, -65504, 65504])
    big = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 1e3
    _, out = roundtrip("bf16", {"x": big})  # torch kernel path when torch is installed
    want = casts.bf16_bits(big).astype(np.uint32) << 16
    np.testing.assert_array_equal(out["x"].view(np.uint32), want)


# ------------------------------------------------------------------------------------------
# composition, sizes, specs, API


COMPOSED = ["fp32", "fp16", "bf16", "affine:8", "affine:4", "affine:2", "affine:1", "topk:0.1",
            "topk:0.1|affine:4|zstd", "ranks|fp16", "topk:0.05:tensor|bf16", "ranks|affine:2",
            "topk:0.5|fp16|zstd:9", "ranks|zstd", "topk:1.0", "topk:0.3:tensor|affine:3",
            "sign", "topk:0.1|sign|zstd", "ranks|sign", "sign:tensor"]


def model_tensors(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    a, b = lora_pair(rng, r=8, d_in=27, d_out=16)
    return {
        "conv1.lora_A.weight": a.reshape(8, 3, 3, 3) * scale,
        "conv1.lora_B.weight": b * scale,
        "fc.weight": rng.standard_normal((10, 16)).astype(np.float32) * scale,
        "fc.bias": rng.standard_normal(10).astype(np.float32) * scale,
        "gn.weight": np.ones(16, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


@pytest.mark.parametrize("spec", COMPOSED)
def test_composed_specs_roundtrip(spec):
    t = model_tensors(0)
    payload, out = roundtrip(spec, t)
    pipe = parse_spec(spec)
    assert pipe.spec == parse_spec(pipe.spec).spec
    assert decode_payload(payload).keys() == t.keys()
    assert pipe.decode(payload)["fc.weight"].tobytes() == out["fc.weight"].tobytes()
    scale = max(float(np.abs(v).max()) for v in t.values() if v.size)
    for k, x in t.items():
        err = np.abs(out[k] - x)
        if spec.startswith("topk"):
            kept = out[k] != 0
            err = err[kept]  # dropped entries are zero-filled
        if err.size:
            bound = {"fp32": 0, "fp16": 2e-3, "bf16": 1e-2}.get(spec.split("|")[-1], 1.0)
            assert float(err.max()) <= bound * scale + 1e-6, (spec, k)
    if pipe.lossless:
        with pytest.raises(NotImplementedError):
            pipe.predicted_size(t)
    else:
        assert len(payload) == pipe.predicted_size(t)


@SETTINGS
@given(spec=st.sampled_from([s for s in COMPOSED if "zstd" not in s] + ["topk:0.01", "ranks|bf16"]),
       seed=st.integers(0, 1000), scale=st.sampled_from([1.0, 1e-20, 1e20, 0.0]))
def test_predicted_size_is_exact(spec, seed, scale):
    t = model_tensors(seed, scale)
    pipe = parse_spec(spec)
    assert len(pipe.encode(t)) == pipe.predicted_size(t)


def test_torch_tensors_and_dtypes_accepted():
    torch = pytest.importorskip("torch")
    t = {"a": torch.randn(4, 5, dtype=torch.bfloat16), "b": torch.randn(3, dtype=torch.float64),
         "c": torch.ones(2, 2, dtype=torch.float16, requires_grad=True)}
    out = decode_payload(parse_spec("fp32").encode(t))
    np.testing.assert_array_equal(out["a"], t["a"].float().numpy())
    assert out["b"].dtype == np.float32
    with pytest.raises(CodecError, match="not a float dtype"):
        parse_spec("fp32").encode({"i": np.arange(3)})


@pytest.mark.parametrize("spec", ["fp32", "fp16", "bf16", "affine:4", "topk:0.5", "ranks", "sign"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_rejected(spec, bad):
    x = np.ones((4, 5), np.float32)
    x[2, 3] = bad
    with pytest.raises(CodecError, match="NaN or Inf"):
        parse_spec(spec).encode({"w.lora_A": x})


@pytest.mark.parametrize("spec", ["fp32", "fp16", "bf16", "affine:4", "topk:0.1",
                                  "topk:1.0|affine:4", "ranks|affine:8", "topk:0.01:tensor"])
@pytest.mark.parametrize("shape", [(1, 1_200_000), (600, 1000), (40_000, 16)])
def test_nonfinite_input_rejected_on_large_tensors(spec, shape):
    """The chunked / multi-threaded / torch paths must see a NaN wherever it hides."""
    x = np.zeros(shape, np.float32)
    for flat_pos in (0, x.size // 2 + 1, x.size - 1):
        y = x.copy()
        y.reshape(-1)[flat_pos] = np.nan
        with pytest.raises(CodecError, match="NaN or Inf"):
            parse_spec(spec).encode({"a.lora_A": y})


@pytest.mark.parametrize("spec,canonical", [
    ("fp32", "fp32"), (" topk:5e-2 | affine:4 | zstd ", "topk:0.05|affine:4|zstd"),
    ("fp32|zstd", "zstd"), ("topk:0.1|fp32", "topk:0.1"), ("zstd:3", "zstd"),
    ("ZSTD:9", "zstd:9"), ("topk:1", "topk:1.0"), ("topk:.25:TENSOR|bf16", "topk:0.25:tensor|bf16"),
    ("ranks", "ranks"), ("affine:08", "affine:8"), ("fp16|zstd|zstd:1", "fp16|zstd|zstd:1"),
])
def test_spec_canonical(spec, canonical):
    pipe = parse_spec(spec)
    assert pipe.spec == canonical
    assert parse_spec(pipe.spec).spec == pipe.spec
    assert Pipeline.from_config(pipe.get_config()) == pipe
    assert Pipeline.from_config({"spec": spec}).spec == canonical


@pytest.mark.parametrize("spec,part", [
    ("", "empty"), ("topk:0", "topk:0"), ("topk:1.5", "topk:1.5"), ("topk:nan", "topk:nan"),
    ("topk", "topk"), ("topk:0.1:layer", "layer"), ("affine:9", "affine:9"),
    ("affine:0", "affine:0"),
    ("affine", "affine"), ("affine:2.5", "affine:2.5"), ("lz4", "lz4"), ("fp32||zstd", "empty"),
    ("affine:4|topk:0.1", "topk"), ("fp16|bf16", "bf16"), ("zstd|fp16", "fp16"),
    ("topk:0.1|ranks", "ranks"), ("zstd:99", "zstd:99"), ("fp16:2", "fp16:2"),
    ("ranks:1", "ranks:1"),
])
def test_spec_errors_name_the_bad_part(spec, part):
    with pytest.raises(SpecError) as ei:
        parse_spec(spec)
    assert part in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_expected_and_limits():
    t = {"a": np.ones((3, 4), np.float32), "b": np.zeros(5, np.float32)}
    payload = parse_spec("affine:4").encode(t)
    assert decode_payload(payload, expected={"b": (5,), "a": [3, 4]}).keys() == t.keys()
    for expected, name in [({"a": (3, 4)}, "'b'"), ({"a": (3, 4), "b": (5,), "c": (1,)}, "'c'"),
                           ({"a": (4, 3), "b": (5,)}, "'a'")]:
        with pytest.raises(CodecError, match=name):
            decode_payload(payload, expected=expected)
    with pytest.raises(CodecError, match="max_elements"):
        decode_payload(payload, max_elements=16)
    assert decode_payload(payload, max_elements=17)
    with pytest.raises(CodecError, match="encoded with"):
        parse_spec("affine:8").decode(payload)
    with pytest.raises(CodecError):
        decode_payload(payload + b"\x00")


def test_config_roundtrip_of_every_stage():
    pipe = parse_spec("topk:0.05:tensor|affine:3|zstd:7")
    cfg = pipe.get_config()
    assert cfg["stages"][0] == {"id": "topk", "density": 0.05, "per_tensor": True}
    assert Pipeline.from_config(cfg).spec == pipe.spec
    with pytest.raises(SpecError):
        Pipeline.from_config({"stages": [{"id": "affine", "bits": 12}]})


@pytest.mark.parametrize("engine", ["torch", "numba", "auto"])
def test_every_engine_gives_the_payloads_of_the_plain_numpy_path(monkeypatch, engine):
    """Payload bytes and decoded values do not depend on the engine (numba's fused kernels,
    torch's kernels) or on torch being installed: each engine is compared, bit for bit, with plain
    numpy (no torch, ENGINE=numpy)."""
    pytest.importorskip("torch")
    if engine == "numba":
        pytest.importorskip("numba")
    rng = np.random.default_rng(11)
    t = {"big.lora_A": rng.standard_normal((64, 1200)).astype(np.float32),
         "big.lora_B": (rng.standard_normal((1200, 64)) * 1e-3 + 5).astype(np.float32),
         "far": (rng.standard_normal((3, 50000)) * 1e-6 + 100).astype(np.float32),
         "long": rng.standard_normal((2, 1 << 21)).astype(np.float32),
         "odd": rng.standard_normal((3, 7, 5)).astype(np.float32)}
    t["far"][1] = 7.0  # a constant slice among big ones
    t["long"][1, 12345] = 40.0  # an outlier
    short = rng.standard_normal((2000, 20)).astype(np.float32)  # the short-row min/max pass
    short[::7] = 0.0
    short[::7, ::3] = -0.0  # rows of signed zeros
    short[5] = 3.0  # a constant row
    t["short.lora_B"] = short
    specs = ["affine:8", "affine:3", "affine:1", "bf16", "fp16", "topk:0.1|affine:2",
             "ranks|affine:4",
             # top-k's compiled selection, bitmap packing and dense decode (bitmaps, gap
             # varints, all-kept and none-kept tensors) against numpy's
             "topk:0.1", "topk:0.005", "topk:0.3:tensor|affine:3", "topk:0.02:tensor"]
    monkeypatch.setattr(quantize, "ENGINE", engine)
    with_engine = {s: parse_spec(s).encode(t) for s in specs}
    decoded = {s: decode_payload(p) for s, p in with_engine.items()}
    if engine in ("numba", "auto"):
        assert quantize._jit() is not None  # the fused kernels really ran
    monkeypatch.setattr(quantize, "ENGINE", "numpy")
    for mod in (compression_arrays, casts, quantize):
        monkeypatch.setattr(mod, "_torch", None)
    for s in specs:
        assert parse_spec(s).encode(t) == with_engine[s], s
        out = decode_payload(with_engine[s])
        for k in t:
            np.testing.assert_array_equal(out[k], decoded[s][k])


def short_rows_cases():
    """(g, m) arrays of short rows (m < 256) and long ones (>= 2**15 values: the fused
    ``affine_rows`` path) with every kind of row the parameters treat apart."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4096, 16)) * 1e-2).astype(np.float32)
    x[1] = 0.0
    x[2] = -0.0
    x[3] = 2.5                      # constant rows: positive, negative, subnormal, huge
    x[4] = -7.0
    x[5] = 1e-45
    x[6] = -3e38
    x[7] = np.linspace(1e7, 1e7 + 4, 16)        # |z - qmin| >= 2**22: the float64 path
    x[8] = np.linspace(-1e-38, 1e-38, 16)       # subnormal spread: the scale's floors
    x[9] = np.linspace(-1e30, 1e30, 16)
    x[10] = np.float32(1e-3) * np.arange(16)    # ties at the range ends
    x[11, ::2] = 3e-39
    yield x
    yield (rng.standard_normal((2048, 40)) * 1e-3 + 5).astype(np.float32)
    yield rng.integers(-3, 4, (300, 200)).astype(np.float32)
    # long rows (min/max by int keys): the same kinds of row
    y = (rng.standard_normal((12, 3000)) * 1e-2).astype(np.float32)
    y[1] = 0.0
    y[2, ::2] = -0.0               # zeros of both signs
    y[3] = 2.5
    y[4] = -1e-45
    y[5] = np.linspace(1e7, 1e7 + 4, 3000)
    y[6] = np.linspace(-1e30, 1e30, 3000)
    y[7, 5] = -np.float32(3e38)
    yield y


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_fused_short_row_quantizer_is_bit_identical_to_the_general_path(monkeypatch, bits):
    """``_jit.affine_rows`` (min/max, parameters and values of each short row in one pass) gives
    the scales, zero-points and values of the general path (numpy parameters, separate passes),
    and refuses NaN / Inf / near-FLT_MAX rows with the same errors."""
    pytest.importorskip("numba")
    jit = quantize._jit()
    assert jit is not None
    for x in short_rows_cases():
        fused = quantize._quantize_short_rows(jit, x, bits)
        with monkeypatch.context() as mp:
            mp.setattr(quantize, "_TORCH_MIN", 1 << 40)  # quantize_groups: the general path
            s, z, u = quantize.quantize_groups(x, bits)
            general = (s.copy(), z.copy(), u[: x.size].copy())
        assert fused[0].tobytes() == general[0].tobytes()
        assert np.array_equal(fused[1], general[1])
        assert fused[2][: x.size].tobytes() == general[2].tobytes()
        assert not fused[2][x.size:].any()  # the padding to a multiple of 8
    for (bad, why), shape in itertools.product(
            ((np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (-np.inf, "NaN or Inf"),
             (3.4e38, "float32 limit")), ((4096, 16), (16, 5000))):
        x = np.zeros(shape, np.float32)
        x[5, 3] = bad
        if bad == 3.4e38:
            x[5, 4] = -3.4e38
        with pytest.raises(CodecError, match=why):
            quantize._quantize_short_rows(jit, x, bits)
        with monkeypatch.context() as mp:
            mp.setattr(quantize, "_TORCH_MIN", 1 << 40)
            with pytest.raises(CodecError, match=why):
                quantize.quantize_groups(x, bits)


@pytest.mark.parametrize("bits", range(1, 8))
def test_compiled_bit_packing_is_the_numpy_layout(bits):
    """``_jit.pack_groups`` / ``unpack_groups`` (8 values <-> ``bits`` bytes) write and read
    exactly ``binary.pack_bits``'s bytes at every width; ``quantize._pack`` / ``_unpack`` (the
    kernels split across threads for 3, 5, 6, 7 bits, numpy's shifts for 1, 2, 4) too, for
    lengths that end inside a group."""
    pytest.importorskip("numba")
    from fedlora.compression.binary import pack_bits, unpack_bits

    jit = quantize._jit()
    rng = np.random.default_rng(bits)
    for n in (1 << 15, (1 << 15) + 5, 100_003):
        vals = rng.integers(0, 1 << bits, n).astype(np.uint8)
        padded = np.zeros(n + (-n) % 8, np.uint8)
        padded[:n] = vals
        want = pack_bits(vals, bits)
        groups = padded.size // 8
        direct = np.empty(groups * bits, np.uint8)
        jit.pack_groups(padded, bits, 0, groups, direct)
        assert direct[: want.size].tobytes() == want.tobytes(), (bits, n)
        assert quantize._pack(padded, n, bits).tobytes() == want.tobytes(), (bits, n)
        back = np.zeros(padded.size, np.uint8)
        jit.unpack_groups(direct, bits, 0, groups, back)
        assert back[:n].tobytes() == vals.tobytes()
        assert quantize._unpack(want, n, bits).tobytes() == vals.tobytes()
        assert unpack_bits(want, n, bits).tobytes() == vals.tobytes()


def test_many_tensors_in_one_encode_do_not_share_scratch_memory():
    """Each tensor's quantized bytes come from per-encode scratch memory: a payload of many
    tensors must equal the concatenation of the tensors' own value sections (a reused buffer
    would leave the last tensor's bytes in every section), and a second encode must not change
    the first payload."""
    rng = np.random.default_rng(3)
    t = {f"w{i}": rng.standard_normal((8, 5000)).astype(np.float32) * (i + 1) for i in range(4)}
    pipe = parse_spec("affine:8")
    pipe.encode(t)  # the first encode sizes this thread's scratch block; the next ones use it
    whole = pipe.encode(t)
    first = bytes(whole)
    out = decode_payload(whole)
    for k, x in t.items():
        alone = decode_payload(pipe.encode({k: x}))[k]
        np.testing.assert_array_equal(out[k], alone)
    pipe.encode({k: -x for k, x in t.items()})
    assert whole == first


# ------------------------------------------------------------------------------------------
# sign


@SETTINGS
@given(x=shapes().flatmap(arrays))
@example(x=np.array([[-1.0, -0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]], np.float32))
@example(x=np.array([[3e38, -3e38, 3e38]], np.float32))
@example(x=np.array([[-1.4e-45, 0.0, 0.0, 0.0]], np.float32))  # the mean rounds to 0
def test_sign_decodes_each_slice_to_its_mean_magnitude_times_the_sign(x):
    payload, out = roundtrip("sign", {"w": x, "v": x.reshape(-1)})

    def want(x2):
        x2 = x2.astype(np.float64)
        s = (np.abs(x2).mean(axis=1) if x2.shape[1] else np.zeros(x2.shape[0])).astype(np.float32)
        return np.where(x2 < 0, -s[:, None], s[:, None]).astype(np.float32) + np.float32(0)
        # (0 and -0.0 go "+"; a slice whose mean rounds to 0 decodes to +0.0: hence the + 0)

    assert out["w"].tobytes() == want(x.reshape(x.shape[0], -1)).tobytes()
    assert out["v"].tobytes() == want(x.reshape(1, -1)).tobytes()  # 1-D: one slice
    # after the header: one float32 scale per slice and one bit per value, nothing else
    hdr = payload_header("sign", [("w", x.shape), ("v", (x.size,))])
    bits = (x.size + 7) // 8
    assert len(payload) == len(hdr) + 4 * x.shape[0] + bits + (4 + bits) * (x.size > 0)


@pytest.mark.parametrize("spec", ["fp32", "affine:8", "sign", "ranks|sign", "topk:0.5|sign"])
def test_edge_shapes_roundtrip(spec):
    """A 0-d tensor keeps its shape; a LoRA factor with no rank at all encodes (ranks)."""
    t = {"s": np.float32(-2.5), "e.lora_A": np.zeros((0, 6), np.float32),
         "e.lora_B": np.zeros((6, 0), np.float32), "w": np.arange(6, dtype=np.float32) - 2}
    _, out = roundtrip(spec, t)
    assert out["s"].shape == () and out["e.lora_A"].shape == (0, 6)
    if spec in ("fp32", "affine:8"):
        assert float(out["s"]) == -2.5


def test_sign_tensor_has_one_scale_per_tensor():
    rng = np.random.default_rng(4)
    t = {"b.lora_B": rng.standard_normal((16, 4, 1, 1)).astype(np.float32),
         "v": rng.standard_normal(7).astype(np.float32)}
    payload, out = roundtrip("sign:tensor", t)
    for k, x in t.items():
        s = np.float32(np.abs(x.astype(np.float64)).mean())
        assert out[k].tobytes() == np.where(x < 0, -s, s).astype(np.float32).tobytes()
    hdr = payload_header("sign:tensor", [(k, v.shape) for k, v in t.items()])
    assert len(payload) == len(hdr) + (4 + 8) + (4 + 1)  # one scale + the sign bits, each
    hdr_sign = payload_header("sign", [(k, v.shape) for k, v in t.items()])
    assert (len(parse_spec("sign").encode(t)) - len(hdr_sign)
            == len(payload) - len(hdr) + 4 * 15)  # "sign": 16 scales instead of 1 for lora_B
    pipe = parse_spec("sign:tensor")
    assert pipe.spec == "sign:tensor" and Pipeline.from_config(pipe.get_config()).spec == pipe.spec
    for bad in ("sign:slice", "sign:tensor:1"):
        with pytest.raises(SpecError, match="sign takes"):
            parse_spec(bad)


def test_sign_scale_is_the_l2_optimal_one_and_beats_affine1():
    """``s = mean|x|`` minimises ``||x - s*sign(x)||``: error^2 = ||x||^2 - m*s^2 (contractive);
    any other scale is worse. ``affine:1`` (two levels ``max - min`` apart) is far worse on
    centred data."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 500)).astype(np.float32)
    dec = decode_payload(parse_spec("sign").encode({"w": x}))["w"].astype(np.float64)
    x64 = x.astype(np.float64)
    err = ((x64 - dec) ** 2).sum(axis=1)
    s = np.abs(x64).mean(axis=1)
    np.testing.assert_allclose(err, (x64 ** 2).sum(axis=1) - 500 * s ** 2, rtol=1e-5)
    assert (err < (1 - 1 / 500) * (x64 ** 2).sum(axis=1)).all()
    for f in (0.95, 1.05):
        assert (((x64 - f * dec) ** 2).sum(axis=1) > err).all()
    aff = decode_payload(parse_spec("affine:1").encode({"w": x}))["w"].astype(np.float64)
    assert ((x64 - aff) ** 2).sum() > 2 * err.sum()


def test_error_feedback_with_sign_tracks_the_sum_of_updates():
    rng = np.random.default_rng(11)
    pipe = parse_spec("sign")
    ef = ErrorFeedback()
    true_sum = np.zeros((20, 30))
    sent = np.zeros((20, 30))
    drift = []
    for _ in range(60):
        u = {"w": (0.1 + rng.standard_normal((20, 30)) * 0.05).astype(np.float32)}
        true_sum += u["w"]
        comp = ef.compensate(u)
        dec = pipe.decode(pipe.encode(comp))
        ef.update(comp, dec)
        sent += dec["w"]
        drift.append(np.linalg.norm(true_sum - sent))
    assert max(drift[20:]) < 1.5 * max(drift[:20])  # the residual stays bounded
    assert drift[-1] < 0.02 * np.linalg.norm(true_sum)


# ------------------------------------------------------------------------------------------
# error feedback


def test_error_feedback_tracks_the_sum_of_updates():
    rng = np.random.default_rng(5)
    pipe = parse_spec("topk:0.05")
    bias = rng.standard_normal((20, 30)).astype(np.float32) * 0.1  # a persistent direction
    ef = ErrorFeedback()
    true_sum = np.zeros((20, 30))
    sent_ef = np.zeros((20, 30))
    sent_plain = np.zeros((20, 30))
    drift_plain, drift_ef = [], []
    for rnd in range(60):
        u = {"w": bias + rng.standard_normal((20, 30)).astype(np.float32) * 0.05}
        true_sum += u["w"]
        sent_plain += pipe.decode(pipe.encode(u))["w"]
        comp = ef.compensate(u)
        dec = pipe.decode(pipe.encode(comp))
        ef.update(comp, dec)
        sent_ef += dec["w"]
        # the identity: what was sent + what is still owed == everything
        np.testing.assert_allclose(sent_ef + ef.state_dict()["w"], true_sum, atol=1e-3)
        ef = ErrorFeedback.from_state_dict(ef.state_dict())  # persisted between rounds
        drift_plain.append(np.linalg.norm(true_sum - sent_plain))
        drift_ef.append(np.linalg.norm(true_sum - sent_ef))
    assert drift_plain[-1] > 2.5 * drift_plain[19]  # grows ~linearly without EF
    assert max(drift_ef[20:]) < 1.5 * max(drift_ef[:20])  # bounded with EF
    assert drift_ef[-1] < drift_plain[-1] / 5


def test_error_feedback_state_and_shapes():
    ef = ErrorFeedback.from_state_dict({})
    x = {"a": np.ones((2, 2), np.float32)}
    c = ef.compensate(x)
    ef.update(c, {"a": np.zeros((2, 2), np.float32)})
    assert ef.state_dict()["a"].sum() == 4
    np.testing.assert_array_equal(ef.compensate(x)["a"], 2 * np.ones((2, 2)))
    np.testing.assert_array_equal(ef.compensate({"a": np.ones(3, np.float32)})["a"], np.ones(3))
    ef.update({"a": np.ones(3, np.float32)}, {})  # not sent at all: everything is owed
    np.testing.assert_array_equal(ef.state_dict()["a"], np.ones(3))


def test_an_unknown_codec_engine_is_named_in_the_error(monkeypatch):
    monkeypatch.setattr(quantize, "ENGINE", "nmba")
    with pytest.raises(SpecError, match="FEDLORA_CODEC_ENGINE='nmba'"):
        parse_spec("affine:8").encode({"w": np.ones((4, 4), np.float32)})


@pytest.mark.parametrize("spec", ["topk:0.1", "topk:0.02|affine:8", "topk:0.1:tensor"])
def test_topk_from_scratch_memory_keeps_exactly_the_reference_selection(spec):
    """Inside an encode, top-k's candidate and kept buffers come from per-encode scratch memory
    (several tensors, several chunks each): the decoded payload must equal the selection made
    outside any encode (fresh arrays), on a warm scratch block with other data left in it."""
    rng = np.random.default_rng(8)
    t = {f"w{i}": (rng.standard_normal((100, 3000)) * (i + 1)).astype(np.float32)
         for i in range(3)}
    pipe = parse_spec(spec)
    pipe.encode({k: -v[::-1].copy() for k, v in t.items()})  # warm scratch with other values
    out = decode_payload(pipe.encode(t))
    density = pipe.sparsifier.density
    mask = topk_mask(t, density, per_tensor=spec.endswith(":tensor"))
    for k, x in t.items():
        ref = np.where(mask[k], x, 0.0)
        if "affine" in spec:
            np.testing.assert_array_equal(out[k] != 0, mask[k])
            np.testing.assert_allclose(out[k], ref, atol=float(np.abs(x).max()) / 100)
        else:
            np.testing.assert_array_equal(out[k], ref)
