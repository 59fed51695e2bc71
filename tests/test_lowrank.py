"""``lowrank:r`` (fedlora/compression/lowrank.py): PowerSGD's compressor as a codec stage.

What is proved here: the decode is the best rank-r approximation (Eckart–Young: its error is the
dropped singular values), exact for a matrix of rank <= r, for conv kernels as C_out x C_in*k*k;
which tensors are factored and what the payload holds, byte for byte; the randomized path for
large matrices stays within 1% of the optimum; the decoder's product is the same bits whatever
BLAS would have done and refuses factors that overflow float32; error feedback with it tracks the
sum of the updates; the spec is validated and canonical.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.compression import CodecError, ErrorFeedback, SpecError, decode_payload, parse_spec
from fedlora.compression.lowrank import factored, low_rank_factors, product
from fedlora.compression.payload import _encode_header


def best_rank(x2: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    """The rank-r truncated SVD of ``x2`` (float64) and its squared error."""
    u, s, vt = np.linalg.svd(x2.astype(np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], float((s[r:] ** 2).sum())


@pytest.mark.parametrize("r", [1, 2, 5])
def test_decode_is_the_best_rank_r_approximation(r):
    rng = np.random.default_rng(r)
    w = rng.standard_normal((24, 8, 3, 3)).astype(np.float32)  # a conv kernel: 24 x 72
    out = decode_payload(parse_spec(f"lowrank:{r}").encode({"w": w}), expected={"w": w.shape})
    want, err2 = best_rank(w.reshape(24, 72), r)
    np.testing.assert_allclose(out["w"].reshape(24, 72), want, rtol=0, atol=1e-4)
    got_err2 = float(((out["w"].astype(np.float64) - w) ** 2).sum())
    assert got_err2 == pytest.approx(err2, rel=1e-4)
    assert got_err2 < (1 - r / 24) * float((w.astype(np.float64) ** 2).sum())  # contractive


def test_a_matrix_of_rank_at_most_r_comes_back():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((40, 3)) @ rng.standard_normal((3, 50))).astype(np.float32)
    out = decode_payload(parse_spec("lowrank:3").encode({"x": x}), expected={"x": x.shape})["x"]
    np.testing.assert_allclose(out, x, rtol=0, atol=1e-4 * float(np.abs(x).max()))


def test_what_is_factored_and_the_payload_bytes():
    """fp32 factors: a factored m x n tensor costs exactly 4 r (m + n) bytes, anything else its
    float32 values; vectors and matrices where the factors would not be smaller pass whole."""
    rng = np.random.default_rng(1)
    t = {"conv": rng.standard_normal((16, 4, 3, 3)).astype(np.float32),   # 16 x 36: factored
         "small": rng.standard_normal((3, 4)).astype(np.float32),          # 2*7 >= 12: whole
         "bias": rng.standard_normal(16).astype(np.float32),
         "scalar": np.float32(1.5)}
    assert factored((16, 4, 3, 3), 2) == (16, 36)
    assert factored((3, 4), 2) is None and factored((16,), 2) is None
    assert factored((0, 5), 1) is None and factored((5, 4), 1) == (5, 4)
    pipe = parse_spec("lowrank:2")
    payload = pipe.encode(t)
    head = _encode_header("lowrank:2", [(k, np.shape(v)) for k, v in t.items()])
    assert len(payload) == len(head) + 4 * (2 * (16 + 36) + 12 + 16 + 1)
    assert pipe.predicted_size(t) == len(payload)
    out = decode_payload(payload, expected={k: np.shape(v) for k, v in t.items()})
    for k in ("small", "bias", "scalar"):
        assert out[k].tobytes() == np.asarray(t[k]).tobytes()
    # with affine the unfactored vector is one 4-bit group, not raw float32
    q = parse_spec("lowrank:2|affine:4")
    assert len(q.encode({"bias": t["bias"]})) < len(parse_spec("affine:4").encode(
        {"bias": t["bias"]}))


def test_randomized_path_for_large_matrices_is_near_optimal():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((600, 4)) * [8, 4, 2, 1]) @ rng.standard_normal((4, 700))
    x = (x + 0.05 * rng.standard_normal((600, 700))).astype(np.float32)
    left, right = low_rank_factors(x, 3)  # min(m, n) > 512: range finder, not LAPACK's SVD
    got = ((left.T.astype(np.float64) @ right) - x) ** 2
    _, opt = best_rank(x, 3)
    assert float(got.sum()) <= 1.01 * opt


def test_product_is_bit_reproducible_and_refuses_overflow():
    """The decoder's ``L.T @ R`` is float64 terms added in a fixed order, then one rounding to
    float32: recomputed here one element at a time, it is the same bits (row blocks included)."""
    rng = np.random.default_rng(3)
    left = rng.standard_normal((3, 70)).astype(np.float32)
    right = rng.standard_normal((3, 1000)).astype(np.float32)  # 70 x 1000 > one row block
    got = product(left, right)
    ref = np.zeros((70, 1000), np.float64)
    for k in range(3):
        ref = ref + left[k].astype(np.float64)[:, None] * right[k].astype(np.float64)[None, :]
    assert got.tobytes() == ref.astype(np.float32).tobytes()
    np.testing.assert_allclose(got, left.T @ right, rtol=1e-5, atol=1e-5)
    # hostile factors: each finite, their product beyond float32
    big = np.full((1, 4), 1e30, np.float32)
    body = big.tobytes() + np.full((1, 5), 1e30, np.float32).tobytes()
    payload = _encode_header("lowrank:1", [("w", (4, 5))]) + body
    with pytest.raises(CodecError, match="'w'.*beyond float32"):
        decode_payload(payload, expected={"w": (4, 5)})
    ok = _encode_header("lowrank:1", [("w", (4, 5))]) + np.ones(9, np.float32).tobytes()
    assert (decode_payload(ok, expected={"w": (4, 5)})["w"] == 1).all()


def test_error_feedback_with_lowrank_tracks_the_sum_of_full_rank_updates():
    rng = np.random.default_rng(11)
    pipe = parse_spec("lowrank:1|affine:8")
    ef = ErrorFeedback()
    bias = rng.standard_normal((20, 30)) * 0.1   # a persistent full-rank direction
    true_sum, sent, drift = np.zeros((20, 30)), np.zeros((20, 30)), []
    for _ in range(200):
        u = {"w": (bias + rng.standard_normal((20, 30)) * 0.05).astype(np.float32)}
        true_sum += u["w"]
        comp = ef.compensate(u)
        dec = pipe.decode(pipe.encode(comp), expected={"w": (20, 30)})
        ef.update(comp, dec)
        sent += dec["w"]
        drift.append(np.linalg.norm(true_sum - sent))
    assert max(drift[100:]) < 1.5 * max(drift[:100])  # the residual stays bounded
    assert drift[-1] < 0.1 * np.linalg.norm(true_sum)
    # without feedback the same codec loses most of the persistent direction
    plain = pipe.decode(pipe.encode({"w": bias.astype(np.float32)}), expected={"w": (20, 30)})["w"]
    assert np.linalg.norm(bias - plain) > 0.5 * np.linalg.norm(bias)


def test_spec_is_validated_and_canonical():
    pipe = parse_spec(" lowrank:2 | affine:4 | zstd ")
    assert pipe.spec == "lowrank:2|affine:4|zstd" and pipe.for_updates_only
    assert parse_spec(pipe.get_config()["spec"]) == pipe
    from fedlora.compression import Pipeline
    assert Pipeline.from_config(pipe.get_config()).spec == pipe.spec
    assert not parse_spec("topk:0.1|affine:4").for_updates_only
    for bad in ("lowrank", "lowrank:0", "lowrank:1.5", "lowrank:x", "lowrank:2:3",
                "lowrank:2000", "lowrank:-1"):
        with pytest.raises(SpecError, match="lowrank"):
            parse_spec(bad)
    with pytest.raises(SpecError, match="more than one sparsifier"):
        parse_spec("lowrank:2|topk:0.1")
