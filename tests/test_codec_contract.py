"""Contracts of the codec library (fedlora/compression) that the rest of fedlora relies on.

1. The wire does not change: every codec spec the codec tests use encodes three fixed messages to
   exactly the bytes the code wrote before ``compression/base.py`` was split by concern (SHA-256
   digests recorded from that code, with zstandard 0.25.0 / libzstd 1.5.7 as pinned in
   pyproject.toml: the zstd specs' digests pin the compressor's output too).
2. The decoder's memory contract (``compression/payload.py``, docs/wire-format.md): without
   expected shapes a payload may declare at most ``E x len(payload) + 1 MiB`` of tensors, checked
   before anything is allocated; a zstd layer decompresses into one buffer of exactly its
   checked raw length; and a decode's peak allocation stays below ``peak_bound``. Measured with
   ``tracemalloc`` here and, for zstd bombs (zstd's own memory is outside tracemalloc), with the
   peak RSS of a subprocess. Each measurement has a control showing the instrument sees the
   allocation it guards against.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from fedlora.compression import CodecError, decode_payload, parse_spec
from fedlora.compression.binary import uvarint
from fedlora.compression.payload import OUTPUT_ALLOWANCE, _encode_header, peak_bound

MiB = 1 << 20

# ------------------------------------------------------------------------------------------
# 1. the wire bytes

# every codec spec used in tests/test_codecs.py and tests/test_codec_fuzz.py (canonical forms),
# but lowrank's: its factors come from LAPACK's SVD, whose last bits depend on the CPU's kernels
# (its decoder is bit-reproducible: tests/test_lowrank.py)
WIRE_SPECS = [
    "fp32", "fp16", "bf16", "affine:1", "affine:2", "affine:3", "affine:4", "affine:5",
    "affine:6", "affine:7", "affine:8", "topk:0.001", "topk:0.01", "topk:0.02|affine:8",
    "topk:0.05", "topk:0.1", "topk:0.3", "topk:0.5", "topk:0.6", "topk:1.0",
    "topk:1.0|affine:4", "topk:0.1|affine:4", "topk:0.1|affine:4|zstd",
    "topk:0.05|affine:4|zstd", "topk:0.5|fp16|zstd:9", "topk:0.01:tensor", "topk:0.1:tensor",
    "topk:0.05:tensor|bf16", "topk:0.25:tensor|bf16", "topk:0.2:tensor|affine:4",
    "topk:0.3:tensor|affine:3", "topk:0.05:tensor|affine:3|zstd:7", "ranks", "ranks|fp16",
    "ranks|bf16", "ranks|affine:2", "ranks|affine:8", "ranks|zstd", "ranks|bf16|zstd:1",
    "zstd", "zstd:1", "zstd:9", "zstd:19", "zstd|zstd", "fp16|zstd|zstd:1",
    "sign", "topk:0.1|sign|zstd", "ranks|sign", "sign:tensor",
]


def wire_tensor_sets():
    """Three fixed messages: a small model (conv LoRA with zero ranks, 1-D, empty tensor), the
    fuzz message, and a larger one that takes the sampled top-k path, multi-byte gap varints,
    torch's cast kernels and multi-threaded affine passes."""
    rng = np.random.default_rng(20240611)
    a = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    a[[1, 4, 5]] = 0.0
    b = rng.standard_normal((16, 8, 1, 1)).astype(np.float32)
    b[:, [1, 4, 5]] = 0.0
    small = {"conv1.lora_A.weight": a, "conv1.lora_B.weight": b,
             "fc.weight": rng.standard_normal((10, 16)).astype(np.float32),
             "fc.bias": rng.standard_normal(10).astype(np.float32),
             "gn.weight": np.ones(16, np.float32), "empty": np.zeros((0, 4), np.float32)}
    a2 = rng.standard_normal((4, 6)).astype(np.float32)
    a2[1] = 0.0
    b2 = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    b2[:, 1] = 0.0
    fuzz = {"l.lora_A": a2, "l.lora_B": b2, "bias": rng.standard_normal(3).astype(np.float32),
            "w": (rng.standard_normal((3, 40)) * 10).astype(np.float32)}
    la = rng.standard_normal((16, 3000)).astype(np.float32)
    la[[2, 9, 15]] = 0.0
    lb = (rng.standard_normal((3000, 16)) * 1e-2).astype(np.float32)
    lb[:, [2, 9, 15]] = 0.0
    ties = rng.integers(-3, 4, (200, 300)).astype(np.float32)
    far = (rng.standard_normal((3, 20000)) * 1e-6 + 100).astype(np.float32)
    far[1] = 7.0
    large = {"blk.lora_A.weight": la, "blk.lora_B.weight": lb, "ties": ties, "far": far,
             "vec": (rng.standard_normal(50000) * 1e3).astype(np.float32)}
    return [small, fuzz, large]


def wire_digest(pipe, sets, by_digest: bool = False) -> tuple[str, int]:
    """SHA-256 over the length-prefixed payloads of every set, and their total size."""
    h = hashlib.sha256()
    total = 0
    for tensors in sets:
        p = pipe.encode(tensors, by_digest=by_digest)
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
        total += len(p)
    return h.hexdigest(), total


# spec: (SHA-256 over the three length-prefixed payloads, their total size), recorded from the
# code before the split (fedlora/compression/base.py at the commit this test was added on)
WIRE_DIGESTS = {
    "fp32": ("56503d5bcf8071f876d135074fa6f509c360d02ee5f5730b8113eafbbc690b7f", 1067021),
    "fp16": ("9d8c0c912547b4257e7e37739dfeb7de9561a889970e9a8bb12026ceedee97e8", 533627),
    "bf16": ("c960df480b47fa31d6e708613914bd14cd966d071f452eda840283e698091c7a", 533627),
    "affine:1": ("c6b6d7a4e7f9b4ff604bf76bfd8b117f9633f5240fa7757c47ea6ba3c644f5b0", 243789),
    "affine:2": ("0abb67c2a6194e12efa30a7aa54729a01ba400eddefc316e9c85e517d52669cc", 270872),
    "affine:3": ("9a5960fd5782976acc280c92bfab8ff61fb4c67891bccf0ff8e8cc26858e1fb7", 297956),
    "affine:4": ("29e0d68f3856ad58ccf53d7019a9b84b7f37ebabf1ee6cc35a36cbdbe3197723", 325039),
    "affine:5": ("f3a9b411b93bd95bfab34448cd60bf90f806f4595b9ddef0f00ea2723416f548", 352123),
    "affine:6": ("9dd0f501485f6affda37839eec632505f70516fd19e10f646a76d0acfd9f9321", 379206),
    "affine:7": ("2bf1812d81a1a8b2294c3f996d569043225996fdf00f138938c34ddb2dfce091", 406290),
    "affine:8": ("1448fa497cb6e81fa9d99533394de3f61cde3e8a63316a28f0c2ff4b0a95c495", 433373),
    "topk:0.001": ("95a8d9343913d0142477b317fe02ef727511df98a554720d004fe4c5aa4e454c", 1738),
    "topk:0.01": ("4a480b57eaf5c16243bf3bb53cf4b78969ce38d3339024f0b783426df89d9de7", 13606),
    "topk:0.02|affine:8":
        ("45e5830cfe5864245cf9d9c2e54f233597cb0af2a5e7366eb7bbfc867f4542a0", 26950),
    "topk:0.05": ("4ea447f4be5ae225fba11b9f83185b5b8286fc7ad4a8d31a7a2109cb09bdadfe", 59896),
    "topk:0.1": ("f758b233ef6bb4b2a76410938d40983a522d319df1de1a5b638f84ec07e14076", 113257),
    "topk:0.3": ("3f90ff62d38b1df43c9ea5f310820de08cf8b617fcea058d064ce138c127568d", 334137),
    "topk:0.5": ("2d42434c15339dcd443e3ee68a2fe83146745a980f46ebc44938cb40b6a1261d", 549297),
    "topk:0.6": ("525ed647ab2a063398cdad53952512877383242b91c4d2117670d8ee0254b8e7", 660184),
    "topk:1.0": ("f0b5ce80896d52a9bad5822690e49d917159b29e1173bfc741a38b68f185bdd0", 1067061),
    "topk:1.0|affine:4":
        ("1ae11e66adce1574e216e665b322a21f0a162ac0b430e197b524e6a05ec5e445", 308810),
    "topk:0.1|affine:4":
        ("42534cd830abba54e004c8ebcfdc95d622dca75e6e79a5ba36dcb6aa6765a679", 113070),
    "topk:0.1|affine:4|zstd":
        ("0eaa2db40211c3466f25522dea09d5630198dd566450b1f7178b6b0f48edeefa", 101871),
    "topk:0.05|affine:4|zstd":
        ("389548a63056dfcef22b77ec25f70fa1f188b5a9a349626b9fb566e49a6168e3", 54216),
    "topk:0.5|fp16|zstd:9":
        ("27e0f46ebefb4a54554648cdb330ac048747c6a0165d6dad0bd3fafb1a6e1c0a", 111649),
    "topk:0.01:tensor": ("1d1e8d3983b9cca430af70be380a64b0f6f65de30fc381e2419c924866700796", 14010),
    "topk:0.1:tensor": ("5386d481a0e003553ad21b7f762386ce427375938a5f496cd69cb228c816d1dc", 133659),
    "topk:0.05:tensor|bf16":
        ("9cfc6869567ca58e8627a76242b93b9d78a025a1469fd93b8ce7e1d8b2715738", 40342),
    "topk:0.25:tensor|bf16":
        ("efad9c4c6582272a2746c57baee21a0b3c1d9e6edcaa342db940ed61d31e0f34", 167001),
    "topk:0.2:tensor|affine:4":
        ("f055516ca8f90506a2c1f6f797483388eb0b71d967e3e2960400a7ee4b78cad1", 95414),
    "topk:0.3:tensor|affine:3":
        ("100c7d6925457054e0fbbeffb48ef1247380be46be4c4b6bafef4aa5de708cd2", 118134),
    "topk:0.05:tensor|affine:3|zstd:7":
        ("a6182e3f7f7982def6db045678d670502ab917e4c284c018b240ff80c5b492e9", 20144),
    "ranks": ("c1f710cfe61f13c5a4703698ca0167ed31ceb88006eb3b1f7b3f578281d50e8b", 994472),
    "ranks|fp16": ("db145391246e9822bdecf7221052646df8977acc8a2eaefd507e73ae680dfc7f", 497373),
    "ranks|bf16": ("1d0d8c59c5ea7dc4b3e35ab1474a084d2455bc20e0938f564796522cd17ca14b", 497373),
    "ranks|affine:2": ("b0910dcfacc97ecd5ec9deb7277a13979ba418a481f8a471d7c98be6048d9ce8", 266329),
    "ranks|affine:8": ("8186a48e99a4a6764eafc501ca0feb4f4a105cd60be1138f3aca57b72c435a39", 418245),
    "ranks|zstd": ("9b89b6374d814c8d2f76576d631eac683b8cf7e72d18c7f048118b72022c7e81", 521301),
    "ranks|bf16|zstd:1":
        ("4bb49bd9fc31ab5f4465a80e51e7ed24caa3219b7642e03ee1322d36edf716cf", 240654),
    "zstd": ("0d71e2ddb89daee4cf7825dea6fec40ef3e7947cb815d3b5653b3cde58488f02", 530617),
    "zstd:1": ("c82b623f2e38f3086ed4449ca73881401fb1a2f146d6eaddff2d814c4b075835", 539844),
    "zstd:9": ("0f5f2ebf629e9153a359b67138c79ce460a9e0fd0380371745266549fb0c28b0", 521754),
    "zstd:19": ("db1730c85401cb2f63164979917773a0c46eda5eafb2ca259b054cf4bbf5b438", 513145),
    "zstd|zstd": ("e82a2f5931e5952d6ed057429485ad6f13f7d1a51d511c1030f39247a8f6d403", 530683),
    "fp16|zstd|zstd:1":
        ("bee5c9be2a1553d453156a6d66cd0153e31bfb7ce4205d6326e373d4ee9f94a9", 278773),
    # recorded when the ``sign`` codec was added (fedlora/compression/signs.py)
    "sign": ("7e6152e3c0a76370d01cfc4ea932d46a8de79f227e6a0c374b059ed01ccd5d59", 46648),
    "topk:0.1|sign|zstd":
        ("b5bfbe61f92033c2e8851fe47a85a304008465951af79416a84e379235d54768", 10002),
    "ranks|sign": ("fa491400233eebb274687de952bcb37ff756717b490ca8558775f86438d2af40", 44379),
    "sign:tensor": ("7725eed22ef7eaf5350d0b62e830abb05f43914a68862bc335523797f6983764", 33649),
}


@pytest.fixture(scope="module")
def wire_sets():
    return wire_tensor_sets()


def test_every_spec_of_the_codec_tests_is_pinned():
    assert sorted(WIRE_DIGESTS) == sorted(WIRE_SPECS)
    for spec in WIRE_SPECS:
        assert parse_spec(spec).spec == spec  # canonical, so the header carries it as written


@pytest.mark.parametrize("spec", WIRE_SPECS)
def test_payload_bytes_are_unchanged(spec, wire_sets):
    digest, size = wire_digest(parse_spec(spec), wire_sets)
    assert (digest, size) == WIRE_DIGESTS[spec], spec


# payload format 2 (the tensor table as a digest), recorded when it was added: its header and
# body order pinned the same way (the values are format 1's: tests/test_payload_digest.py)
DIGEST_TABLE_WIRE = {
    "fp32": ("f712b543b2a6810011a72ea1cb27137cef130fc4e0640f9ed95a02b7ad413398", 1066839),
    "affine:4": ("c0968ae936b723ab6246694f7f260ae1691a930c0a8f965eae2cb6a1d25e3be8", 324857),
    "topk:0.1|affine:4|zstd":
        ("0748aed7359da75372cfbfe51dd5b45011e9a37224b33f477d90bebf3f2b1356", 101689),
    "ranks|sign": ("d63af5df48d73cfefc93e197c39aff7da084a23367444db4afa584457d0ee30b", 44197),
    "sign:tensor": ("0ecfa96419337c2cbfe6ea8fd75d82318ff531f8dfc23aea5c4324261f6b7ab3", 33467),
}


@pytest.mark.parametrize("spec", sorted(DIGEST_TABLE_WIRE))
def test_digest_table_payload_bytes_are_unchanged(spec, wire_sets):
    assert wire_digest(parse_spec(spec), wire_sets, by_digest=True) == DIGEST_TABLE_WIRE[spec]


@pytest.mark.parametrize("spec", WIRE_SPECS)
def test_legit_payloads_decode_without_expected_shapes(spec, wire_sets):
    """Every spec's payloads decode with no side information (rule 2 does not refuse them) to
    exactly what the decode with expected shapes returns."""
    pipe = parse_spec(spec)
    for tensors in wire_sets:
        payload = pipe.encode(tensors)
        free = decode_payload(payload)
        shaped = decode_payload(payload, expected={k: v.shape for k, v in tensors.items()})
        assert list(free) == list(shaped) == list(tensors)
        for k in tensors:
            assert free[k].tobytes() == shaped[k].tobytes()


# ------------------------------------------------------------------------------------------
# 2. the decoder's memory contract


def traced(fn):
    """``(peak bytes allocated while fn() ran, its result, the CodecError it raised or None)``."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        try:
            result, err = fn(), None
        except CodecError as e:
            result, err = None, e
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    return peak, result, err


def declared(table) -> int:
    return 4 * sum(math.prod(shape) for _, shape in table)


def contract_bound(spec: str, payload_len: int) -> int:
    """Rules 2 + 4 without expected shapes: ``(6 E + 342) P + 11 MiB``."""
    e = parse_spec(spec).max_expansion
    return int((6 * e + 342) * payload_len) + 11 * MiB


def rle_frame(content: int, declared_size: int | None = None, block: int = 1 << 17) -> bytes:
    """A hand-made zstd frame (RFC 8878) of ``content`` zero bytes in RLE blocks: 4 bytes per
    128 KiB, so 1 GiB fits in 32 KiB. ``declared_size``: the frame content size it claims."""
    fcs = content if declared_size is None else declared_size
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    out += bytes([0xC0, 0x38])  # 8-byte content size, no single segment; window 128 KiB
    out += struct.pack("<Q", fcs)
    left = content
    while left:
        n = min(block, left)
        left -= n
        out += (int(left == 0) | (1 << 1) | (n << 3)).to_bytes(3, "little") + b"\x00"
    return bytes(out)


@pytest.fixture(scope="module", autouse=True)
def warm_decoders():
    """Import and compile every decode path once (numba's kernels, zstd), so that the traced
    peaks below count the decode and not one-time start-up work."""
    t = {"a.lora_A": np.ones((4, 8), np.float32), "v": np.ones(3, np.float32)}
    for spec in ["fp32", "fp16", "bf16", "affine:3", "affine:8", "topk:0.5|affine:2|zstd",
                 "ranks|zstd"]:
        decode_payload(parse_spec(spec).encode(t))


def test_stage_factors_and_their_product():
    e = {s: parse_spec(s).max_expansion for s in [
        "fp32", "fp16", "bf16", "affine:1", "affine:4", "topk:0.01", "topk:0.25:tensor|bf16",
        "ranks", "ranks|affine:2", "zstd", "fp16|zstd|zstd", "topk:0.001|affine:1|zstd",
        "sign", "ranks|sign", "lowrank:2", "lowrank:2|affine:4|zstd"]}
    assert e == {"fp32": 1, "fp16": 2, "bf16": 2, "affine:1": 32, "affine:4": 8,
                 "topk:0.01": 200, "topk:0.25:tensor|bf16": 16, "ranks": 16,
                 "ranks|affine:2": 256, "zstd": 32, "fp16|zstd|zstd": 2048,
                 "topk:0.001|affine:1|zstd": 4096,  # capped (2000*32*32)
                 "sign": 32, "ranks|sign": 512, "lowrank:2": 64,
                 "lowrank:2|affine:4|zstd": 4096}  # capped (64*8*32)


def ranks_attack(size=2 ** 28) -> tuple[str, bytes, list]:
    """A ``ranks`` payload declaring a lora_A of 8 x 2**25 (1 GiB of float32) and sending no
    rank slice: a 1-byte body. ``(spec, payload, table)``."""
    table = [("x.lora_A", (8, size // 8))]
    return "ranks", _encode_header("ranks", table) + b"\x00", table


def topk_attack(size=2 ** 28) -> tuple[str, bytes, list]:
    """``topk:1e-09`` of 2**28 elements keeps floor(0.27) = 0 values: the body is one varint."""
    table = [("x", (size,))]
    return "topk:1e-09", _encode_header("topk:1e-09", table) + uvarint(0), table


@pytest.mark.parametrize("attack", [ranks_attack, topk_attack])
def test_tiny_payload_declaring_1_gib_is_refused_before_allocating(attack):
    spec, payload, table = attack()
    assert 20 <= len(payload) <= 35 and declared(table) == 1 << 30
    peak, _, err = traced(lambda: decode_payload(payload))
    assert err is not None and "expected shapes" in str(err)
    assert peak <= contract_bound(spec, len(payload))
    assert peak < MiB  # refused at the header: nothing near the declared size was allocated


@pytest.mark.parametrize("attack", [ranks_attack, topk_attack])
def test_control_the_same_payload_shape_with_expected_shapes_is_allocated_and_seen(attack):
    """The same construction, 16 MiB instead of 1 GiB and with the expected shapes (the caller
    vouches for the size): it decodes to zeros and tracemalloc sees the 16 MiB, so the test above
    would fail if the decoder still allocated the declared size."""
    _, payload, table = attack(size=2 ** 22)
    assert declared(table) == 16 * MiB
    peak, out, err = traced(lambda: decode_payload(payload, expected=dict(table)))
    assert err is None and not any(v.any() for v in out.values())
    assert 16 * MiB <= peak <= peak_bound(declared(table), len(table))
    with pytest.raises(CodecError, match="expected shapes"):
        decode_payload(payload)


def test_rule_2_boundary_is_exact():
    """A ``ranks`` payload sending no rank slice of a 16 x m lora_A: accepted without expected
    shapes exactly while 64 m <= 16 P + 1 MiB."""
    def payload(m):
        return _encode_header("ranks", [("l.lora_A", (16, m))]) + b"\x00\x00"

    p_len = len(payload(20000))  # m's varint is 3 bytes for every m tried here
    m_max = (OUTPUT_ALLOWANCE + 16 * p_len) // 64
    assert len(payload(m_max + 1)) == p_len
    out = decode_payload(payload(m_max))["l.lora_A"]
    assert out.shape == (16, m_max) and not out.any()
    with pytest.raises(CodecError, match="expected shapes"):
        decode_payload(payload(m_max + 1))
    assert decode_payload(payload(m_max + 1), expected={"l.lora_A": (16, m_max + 1)})


def lora_message(n_layers=4, r=16, width=16384, kept=4, seed=0):
    """LoRA factors of 2M elements (8 MiB) where only ``kept`` of ``r`` ranks are non-zero
    (LoRA-A2), plus a 1-D norm."""
    rng = np.random.default_rng(seed)
    t = {}
    for i in range(n_layers):
        a = rng.standard_normal((r, width)).astype(np.float32)
        b = (rng.standard_normal((width, r)) * 0.01).astype(np.float32)
        a[kept:] = 0.0
        b[:, kept:] = 0.0
        t[f"layers.{i}.lora_A.weight"] = a
        t[f"layers.{i}.lora_B.weight"] = b
    t["norm.weight"] = rng.standard_normal(width).astype(np.float32)
    return t


LEGIT = ["fp32", "fp16", "bf16", "affine:1", "affine:4", "affine:8", "topk:0.01",
         "topk:0.1|affine:4|zstd", "topk:0.05:tensor|bf16", "ranks", "ranks|affine:2", "zstd",
         "ranks|bf16|zstd:1", "lowrank:2", "lowrank:4|affine:4|zstd"]


@pytest.fixture(scope="module")
def lora():
    return lora_message()


@pytest.mark.parametrize("spec", LEGIT)
def test_legit_large_payloads_decode_without_expected_shapes_within_the_bound(spec, lora):
    """A message well beyond the 1 MiB allowance, so that rule 2's factor E decides: each codec's
    real payload decodes with no side information, and its traced peak is within rule 4."""
    payload = parse_spec(spec).encode(lora)
    d = 4 * sum(v.size for v in lora.values())
    assert d > 8 * OUTPUT_ALLOWANCE
    peak, out, err = traced(lambda: decode_payload(payload))
    assert err is None, err
    assert list(out) == list(lora)
    assert d <= parse_spec(spec).max_expansion * len(payload) + OUTPUT_ALLOWANCE
    assert peak <= peak_bound(d, len(lora)), (peak / d)


def hostile_bodies(n):
    """Valid payloads built to maximise the decoder's working memory (with expected shapes):
    (spec, table, body). Raw bodies travel under zstd, so the compressed payload is tiny."""
    rng = np.random.default_rng(1)
    cases = []
    # affine, one value per slice: 8 parameter bytes per value, 4-byte zero-points
    body = (bytes([4]) + np.ones(n, "<f4").tobytes() + np.zeros(n, "<i4").tobytes()
            + rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    cases.append(("affine:8|zstd", [("w.lora_B", (n, 1))], body))
    body = (bytes([4]) + np.ones(n, "<f4").tobytes() + np.zeros(n, "<i4").tobytes()
            + b"\x00" * ((3 * n + 7) // 8))
    cases.append(("affine:3|zstd", [("w.lora_B", (n, 1))], body))
    # top-k bitmap keeping all but one entry
    k = n - 1
    d = (k + 0.5) / n
    spec = parse_spec(f"topk:{d!r}:tensor").spec
    bits = np.ones(n, bool)
    bits[-1] = False
    body = (uvarint(k) + b"\x00" + np.packbits(bits, bitorder="little").tobytes()
            + np.ones(k, "<f4").tobytes())
    cases.append((spec + "|zstd", [("x", (n,))], body))
    # top-k gaps at the largest section the decoder accepts (one byte per index)
    k = (n + 7) // 8 - 5
    spec = parse_spec(f"topk:{(k + 0.5) / n!r}:tensor").spec
    body = uvarint(k) + b"\x01" + uvarint(k) + b"\x00" * k + np.ones(k, "<f4").tobytes()
    cases.append((spec + "|zstd", [("x", (n,))], body))
    return cases


@pytest.mark.parametrize("case", range(4))
def test_worst_case_bodies_stay_within_the_peak_bound(case):
    import zstandard

    spec, table, raw = hostile_bodies(1 << 21)[case]
    payload = (_encode_header(spec, table) + uvarint(len(raw))
               + zstandard.ZstdCompressor(write_content_size=True).compress(raw))
    d = declared(table)
    peak, out, err = traced(lambda: decode_payload(payload, expected=dict(table)))
    assert err is None, err
    assert peak <= peak_bound(d, len(table)), (spec, peak / d)
    assert peak >= d  # the instrument sees the output itself


def test_a_header_of_many_tensors_stays_within_the_peak_bound():
    """Per-tensor bookkeeping (names, shapes, empty arrays) is the ``1 KiB x T`` term."""
    table = [(f"{i:x}", (0,)) for i in range(1 << 13)]
    payload = _encode_header("fp32", table)
    assert len(payload) < 8 * len(table)
    peak, out, err = traced(lambda: decode_payload(payload))
    assert err is None and len(out) == len(table)
    assert peak <= peak_bound(0, len(table)) and peak <= contract_bound("fp32", len(payload))


def test_zstd_frame_cannot_write_past_the_checked_raw_length():
    """A frame that declares 4 KiB (matching the layer header) but holds 1 GiB of RLE blocks:
    decompression stops at the 4 KiB buffer (traced here; the RSS test covers zstd itself)."""
    table = [("x", (1024,))]
    payload = _encode_header("zstd", table) + uvarint(4096) + rle_frame(1 << 30, 4096)
    peak, _, err = traced(lambda: decode_payload(payload, expected=dict(table)))
    assert err is not None and "zstd" in str(err)
    assert peak < MiB


RSS_SCRIPT = r"""
import json, sys
sys.modules["torch"] = None  # a faster start; the fp32 and zstd paths never use torch
from fedlora.compression import CodecError, decode_payload, parse_spec
import numpy as np

def maxrss():
    # this process's peak RSS (VmHWM; getrusage's ru_maxrss would include the parent's, which
    # Linux carries over an exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024

def run(path, expected):
    data = open(path, "rb").read()
    before = maxrss()
    try:
        decode_payload(data, expected=expected)
        err = None
    except CodecError as e:
        err = str(e)
    return {"delta": maxrss() - before, "error": err, "size": len(data)}

decode_payload(parse_spec("zstd").encode({"w": np.ones((64, 64), np.float32)}))  # warm up
cases = json.loads(sys.argv[1])
print(json.dumps([run(path, expected) for path, expected in cases]))
"""


def test_zstd_bombs_keep_peak_rss_low(tmp_path):
    """In a fresh process, by its peak RSS: (a) a 32 KiB zstd body expanding to 1 GiB under a
    header that declares 2**28 elements, without expected shapes; (b) a frame declaring 4 KiB
    that holds 1 GiB, with expected shapes. Both are refused and the process's peak RSS grows by
    < 32 MiB. Control (run last, peak RSS only grows): the same bomb at 128 MiB with its expected
    shapes is decoded, and the RSS shows it."""
    bomb = _encode_header("zstd", [("x", (2 ** 28,))]) + uvarint(1 << 30) + rle_frame(1 << 30)
    liar = _encode_header("zstd", [("x", (1024,))]) + uvarint(4096) + rle_frame(1 << 30, 4096)
    control = (_encode_header("zstd", [("x", (2 ** 25,))]) + uvarint(1 << 27)
               + rle_frame(1 << 27))
    cases = []
    for name, data, expected in [("bomb", bomb, None), ("liar", liar, {"x": [1024]}),
                                 ("control", control, {"x": [2 ** 25]})]:
        path = tmp_path / name
        path.write_bytes(data)
        cases.append([str(path), expected])
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(cases)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bomb_r, liar_r, control_r = json.loads(proc.stdout)
    assert 32 * 1024 <= bomb_r["size"] <= 33 * 1024
    assert "expected shapes" in bomb_r["error"] and bomb_r["delta"] < 32 * MiB, bomb_r
    assert "zstd" in liar_r["error"] and liar_r["delta"] < 32 * MiB, liar_r
    assert control_r["error"] is None and control_r["delta"] >= 128 * MiB, control_r


# ------------------------------------------------------------------------------------------
# drive / eden:b (keyed): their factor, rule 2 before allocating, rule 4 on legit payloads


def test_rotated_stage_factors():
    e = {s: parse_spec(s).max_expansion for s in
         ["drive", "drive:mse|zstd", "eden:2", "eden:0.5", "eden:0.25:mse", "eden:0.01|zstd"]}
    assert e == {"drive": 32, "drive:mse|zstd": 1024, "eden:2": 16, "eden:0.5": 64,
                 "eden:0.25:mse": 128, "eden:0.01|zstd": 4096}  # capped (3200 * 32)


def test_rotated_tiny_payload_declaring_1_gib_is_refused_before_allocating():
    from fedlora.compression import rotate

    tag = np.array([rotate.key_tag(3)], "<u4").tobytes()
    for spec in ("drive", "eden:0.25|zstd"):
        table = [("x", (1 << 28,))]
        peak, _, err = traced(lambda: decode_payload(_encode_header(spec, table) + tag, key=3))
        assert err is not None and "pass the expected shapes" in str(err)
        assert peak < 1 * MiB


@pytest.mark.parametrize("spec", ["drive", "eden:0.5|zstd", "eden:4:mse", "eden:0.1"])
def test_rotated_legit_payloads_stay_within_the_peak_bound(spec, lora):
    pipe = parse_spec(spec).keyed(12345)
    payload = pipe.encode(lora)
    shapes = {k: v.shape for k, v in lora.items()}
    pipe.decode(payload, shapes)  # compile
    d = 4 * sum(v.size for v in lora.values())
    for expected in (shapes, None):
        peak, out, err = traced(lambda: decode_payload(payload, expected=expected, key=12345))
        assert err is None, err
        assert peak <= peak_bound(d, len(lora)), (spec, peak / d)
        if expected is None:
            assert d <= parse_spec(spec).max_expansion * len(payload) + OUTPUT_ALLOWANCE
