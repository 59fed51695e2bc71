"""``affine:b`` — FLoCoRA's per-slice affine quantization, bit-packed, ``b`` in 1..8.

Grouping (the ``groups`` hint from the sparsifier): a dense tensor with ndim >= 2 gets one (scale,
zero-point) per dim-0 slice (``r`` for conv lora_A ``[r,Cin,k,k]``, ``C_out`` for lora_B
``[C_out,r,1,1]``, one per output row of a Linear ``[out,in]``); tensors with ndim <= 1 (norms,
biases) travel as raw float32. After ``topk`` the kept values of a tensor (ndim >= 2) form ONE group
(one scale/zero-point per tensor: the kept values are the large ones, so their range is what
matters); after ``ranks`` the kept sub-tensor is grouped per dim-0 slice like a dense tensor.

Scheme, per slice with minimum ``mn`` and maximum ``mx`` (signed range ``qmin = -2^(b-1)``,
``qmax = 2^(b-1)-1``, ``L = qmax - qmin = 2^b - 1``)::

    s  = (mx - mn) / L            rounded UP to float32, floored at max|x|*2^-30 and at FLT_MIN
    z  = round(qmin - mn / s)     an integer (float64 arithmetic, ties to even)
    q  = clamp(round(x * (1/s) + z), qmin, qmax)     (x * (1/s) in float32, then the exact
                                                      sum rounded to nearest, ties to even)
    x' = s * (q - z)              computed as fl(fl(u - (z - qmin)) * s), u = q - qmin

Why ``|x' - x| <= s/2`` holds at every element, the range ends included: ``t = x/s + z`` is affine
in ``x`` with slope 1/s; at ``x = mn`` it equals ``qmin + e`` with ``|e| <= 1/2`` (that is exactly
what rounding ``z`` to the nearest integer gives), and at ``x = mx`` it equals ``qmin + e +
(mx-mn)/s <= qmax + e`` because ``s >= (mx-mn)/L``. So every ``t`` lies in ``[qmin - 1/2, qmax +
1/2]``: rounding moves it by at most 1/2, and clamping only ever pulls a ``t`` that is within 1/2
outside the range back to the boundary, again at most 1/2. In units of ``x`` that is ``s/2``;
float32 arithmetic adds a few ulps of ``max|x|`` (the tests allow ``s/2 + 2e-6 * max|x|``). The
floor ``s >= max|x|*2^-30`` keeps ``|z| <= 2^30 + 128`` (fits int32) and ``x/s`` finite; it only
bites when the slice's spread is below float32 resolution anyway. Rounding ``s`` up (never down)
keeps the clamp argument exact.

Constant slice (``mx == mn == c``, e.g. B = 0 at init): ``s = |c| / K`` with ``K = 2^(b-1)`` (``K =
1`` when ``|c|/K`` would be subnormal; ``s = 1`` when ``c == 0``) and ``z = qmax - K`` (``c > 0``),
``qmin + K`` (``c < 0``) or ``qmin`` (``c == 0``): every element gets ``q = qmax`` / ``qmin`` /
``qmin`` (set directly, no division) and decodes to ``s * (+-K) = c`` exactly (power-of-two
scaling); no NaN/Inf, ``z`` fits int8, and every grid value stays within ``|c|`` so even ``c`` near
FLT_MAX cannot overflow. (Encoding a non-constant slice whose grid would reach beyond float32,
values within ~1% of FLT_MAX, raises CodecError.)

Value section for ``n`` values in ``g > 0`` groups::

    zw      1 byte   zero-point width in bytes: 1, 2 or 4 (the smallest that holds every z)
    scales  g x float32 (finite, > 0)
    zeros   g x signed int of zw bytes (int8 whenever the slice straddles 0, the usual case)
    packed  ceil(n*b/8) bytes: u = q - qmin in b bits per value, LSB-first, row-major, no per-slice
            padding (four 2-bit values per byte, eight 1-bit ...); unused high bits of the last byte
            are zero

With ``g == 0`` the section is ``n`` raw float32. The decoder rejects non-finite or non-positive
scales, bad widths, non-zero padding bits, and parameters whose decoded range would overflow
float32, so decoded values are always finite.

Implementation: per-slice min/max run numpy's SIMD reductions over a small thread pool (for short
slices, < 256 values, e.g. lora_B rows, where numpy pays a per-row overhead: with numba, one
compiled pass per row range does all of it, min/max, parameters and values, while the row is in
L1 (``_jit.affine_rows``); else torch's row reductions). The element-wise passes run, by ``ENGINE`` (``FEDLORA_CODEC_ENGINE``): ``auto`` (default) numba's
fused one-pass kernels from ``_jit.py`` when numba imports, else numpy ufuncs on cache-sized
blocks; ``numba``; ``numpy``; ``torch`` (its OpenMP kernels, big tensors only). All engines compute
the same IEEE operations in the same order, so the payload bytes and decoded values do not depend
on which ran (tested bit for bit). Rounding uses the float32 "magic number" trick: adding
``1.5*2^23 + (z - qmin)`` rounds to an integer (ties to even) and leaves ``u`` in the low mantissa
byte; since both float32 steps are monotonic in ``x``, only slices whose own min or max lands
outside the range need the clamp. The quantized bytes are written to per-encode scratch memory
(``runtime.scratch``): a fresh multi-MB buffer per encode costs more in page faults than the
quantization itself. Decoding checks the per-slice parameters in blocks of slices, so a tensor of
one value per slice (8 parameter bytes a value) needs no full-size temporaries; ``max_expansion``
(the decoder's memory contract, ``payload.py``): ``32/b``.

(Over 400 lines on purpose: the scheme, its error proof, the section layout and the engines that
must agree bit for bit are read together; the bit packing itself is in ``binary.py``.)
"""

from __future__ import annotations

import math
import os
import re
import warnings

import numpy as np

from .arrays import FLT_MAX, _torch, as_bytes, check_finite
from .binary import Reader, pack_bits, packed_len, unpack_bits
from .casts import _FixedWidth
from .codec import DenseSection, Section, ValueCoder, register, slice_groups
from .errors import CodecError, SpecError
from .runtime import run_parallel, scratch

__all__ = ["Affine", "AffineSection", "affine_params", "quantize_groups"]

_MAG = 12582912.0  # 1.5 * 2**23: float32 x + _MAG rounds x to an integer in the low mantissa bits
_TINY = float(np.finfo(np.float32).tiny)
_OVERFLOW_LIMIT = FLT_MAX * (1.0 - 2.0 ** -20)
_CHUNK = 1 << 20       # elements per element-wise block (torch path)
_NP_CHUNK = 1 << 16    # elements per block (numpy path, stays in L2)
_TORCH_MIN = 1 << 15
_PARAM_BLOCK = 1 << 16  # slices per block when checking decoded parameters
_BYTE_WIDTHS = (1, 2, 4, 8)  # bit widths numpy packs with word-wide shifts
# element-wise engine: "auto" (default) = numba's fused one-pass kernels (``_jit.py``) when numba
# imports, else numpy; "numba"; "numpy" = numpy ufuncs on cache-sized blocks over a small thread
# pool; "torch" = torch's OpenMP kernels on 1M-element blocks (big tensors only). Identical IEEE
# operations, identical bytes. torch is fast on an idle machine but its OpenMP barriers stall badly
# when other processes compete for the cores (a federated simulation); numpy and numba run on our
# own thread pool and degrade gracefully. Set with FEDLORA_CODEC_ENGINE.
ENGINE = os.environ.get("FEDLORA_CODEC_ENGINE", "auto")
_ENGINES = ("auto", "numba", "numpy", "torch")
_JIT_MODULE = None


def _jit():
    """The numba kernel module, or None when numba is unavailable or not selected."""
    global _JIT_MODULE
    if ENGINE not in _ENGINES:
        raise SpecError(f"FEDLORA_CODEC_ENGINE={ENGINE!r} is not one of {', '.join(_ENGINES)}")
    if ENGINE not in ("auto", "numba"):
        return None
    if _JIT_MODULE is None:
        try:
            from . import _jit as mod
        except ImportError:  # numba missing: the numpy path computes the same bytes
            if ENGINE == "numba":
                raise
            mod = False
        _JIT_MODULE = mod
    return _JIT_MODULE or None


def _jit_parallel(kernel, n: int, *args) -> list:
    """Run ``kernel(*args, i0, i1, ...)`` over ``[0, n)`` split at multiples of 8 elements."""
    def part(a, b):
        return kernel(*args[:-1], 8 * a, min(n, 8 * b), args[-1])

    return run_parallel(part, -(-n // 8), min_per_part=1 << 15)


def affine_params(mn: np.ndarray, mx: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice ``(scale float32, zero-point int64)`` from slice minima/maxima (finite)."""
    with np.errstate(over="ignore", under="ignore"):  # an overflowing scale is rejected later
        return _affine_params(np.asarray(mn, dtype=np.float64), np.asarray(mx, dtype=np.float64),
                              bits)


def _affine_params(mn: np.ndarray, mx: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    qmin = -(1 << (bits - 1))
    levels = (1 << bits) - 1
    s64 = (mx - mn) / levels
    s = s64.astype(np.float32)
    low = s.astype(np.float64) < s64
    if low.any():
        s[low] = np.nextafter(s[low], np.float32(np.inf))
    amax = np.maximum(np.abs(mn), np.abs(mx))
    s = np.maximum(s, (amax * 2.0 ** -30).astype(np.float32))
    s = np.maximum(s, np.float32(_TINY))
    const = mn == mx
    if const.any():
        c = mn[const]
        # K = 2^(b-1) keeps the grid within |c| (no overflow near FLT_MAX) and z in int8, while c/K
        # stays an exact float32; K = 1 when c/K would be subnormal
        kk = float(1 << (bits - 1))
        kk = np.where(np.abs(c) / kk >= _TINY, kk, 1.0)
        s[const] = np.where(c != 0, np.abs(c) / kk, 1.0).astype(np.float32)
    z = np.rint(qmin - mn / s.astype(np.float64))
    if const.any():
        qmax = qmin + levels
        z[const] = np.where(c > 0, qmax - kk, np.where(c < 0, qmin + kk, qmin))
    return s, z.astype(np.int64)


def _overflow_bound(s: np.ndarray, z: np.ndarray, bits: int) -> float:
    """The largest ``|x'|`` the per-slice ``(s, z)`` can decode to (float64), computed over
    blocks of slices so that no temporary outgrows a block (``z``: any integer dtype)."""
    qmin = -(1 << (bits - 1))
    qmax = (1 << (bits - 1)) - 1
    bound = 0.0
    for c0 in range(0, z.size, _PARAM_BLOCK):
        zc = z[c0:c0 + _PARAM_BLOCK].astype(np.int64)
        far = np.maximum(np.abs(qmin - zc), np.abs(qmax - zc)).astype(np.float64)
        far *= s[c0:c0 + _PARAM_BLOCK]
        bound = max(bound, float(far.max(initial=0.0)))
    return bound


def _zero_offsets(z: np.ndarray, qmin: int) -> np.ndarray:
    """``float32(z - qmin)`` per slice (exact integer difference, then rounded), by blocks."""
    zu = np.empty(z.size, np.float32)
    for c0 in range(0, z.size, _PARAM_BLOCK):
        zu[c0:c0 + _PARAM_BLOCK] = z[c0:c0 + _PARAM_BLOCK].astype(np.int64) - qmin
    return zu


# ------------------------------------------------------------------------------------------
# kernels


def _blocks(g: int, m: int, chunk: int):
    """Yield (r0, r1, c0, c1) blocks of a (g, m) array, about ``chunk`` elements each."""
    if m >= chunk:
        for r in range(g):
            for c0 in range(0, m, chunk):
                yield r, r + 1, c0, min(m, c0 + chunk)
    else:
        rows = max(1, chunk // max(m, 1))
        for r0 in range(0, g, rows):
            yield r0, min(g, r0 + rows), 0, m


def _row_minmax(x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row min and max (NaN propagates)."""
    g, m = x2.shape
    jit = _jit()
    if m < 256 and g > 1 and m > 0 and x2.size >= _TORCH_MIN and jit is not None:
        # short rows (lora_B slices of r values): one compiled pass per row range (level with
        # torch's row reductions at best, steady under load: benchmarks/codecs.py --layout lora)
        mn, mx = np.empty(g, x2.dtype), np.empty(g, x2.dtype)
        run_parallel(lambda a, b: jit.row_minmax(x2, a, b, mn, mx), g,
                     min_per_part=max(1, (1 << 17) // m))
        return mn, mx
    if m < 256 and g > 1 and _torch is not None and x2.size >= _TORCH_MIN:
        # torch's reductions vectorize across short rows (lora_B slices of r values) where numpy
        # pays a per-row overhead
        t = _torch.from_numpy(x2)
        return _torch.amin(t, dim=1).numpy(), _torch.amax(t, dim=1).numpy()
    if g == 1:
        parts = run_parallel(lambda a, b: (x2[0, a:b].min(), x2[0, a:b].max()), m,
                             min_per_part=1 << 19)
        mins = np.array([p[0] for p in parts], np.float32)
        maxs = np.array([p[1] for p in parts], np.float32)
        return mins.min(keepdims=True), maxs.max(keepdims=True)  # NaN propagates
    parts = run_parallel(lambda a, b: (x2[a:b].min(axis=1), x2[a:b].max(axis=1)), g,
                         min_per_part=max(1, (1 << 19) // m))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _for_blocks(g: int, m: int, chunk: int, fn) -> None:
    """Run ``fn(r0, r1, c0, c1, tmp)`` over cache-sized blocks of a (g, m) array, split across the
    worker pool; ``tmp`` is a per-worker float32 scratch buffer of ``chunk`` elements."""
    blocks = list(_blocks(g, m, chunk))

    def part(lo, hi):
        tmp = np.empty(min(chunk, g * m), np.float32)
        for i in range(lo, hi):
            fn(*blocks[i], tmp)

    run_parallel(part, len(blocks), min_per_part=2)


def _quantize(x2: np.ndarray, inv: np.ndarray, zu: np.ndarray, bits: int,
              mn: np.ndarray, mx: np.ndarray) -> np.ndarray:
    """u = clamp(rint(fl(x*inv) + zu), 0, 2^b-1) as uint8 (flat; length padded to a multiple of 8).

    The add of ``1.5*2^23 + zu`` rounds to an integer (ties to even) exactly when |zu| < 2^22;
    clamping to [MAG, MAG + L] then leaves u in the low byte of the float32 bit pattern. Both
    float32 steps are monotonic in x, so a slice needs the clamp only if its own min or max lands
    outside the range (a rounding tie at a range end): the clamp pass runs on those slices only."""
    g, m = x2.shape
    n = g * m
    levels = (1 << bits) - 1
    u = scratch(n + (-n) % 8)
    u[n:] = 0
    u2 = u[:n].reshape(g, m)
    big = np.abs(zu) >= (1 << 22)
    madd = (np.where(big, 0, zu) + _MAG).astype(np.float32)
    lo, hi = np.float32(_MAG), np.float32(_MAG + levels)
    t_lo = np.multiply(np.asarray(mn, np.float32), inv) + madd
    t_hi = np.multiply(np.asarray(mx, np.float32), inv) + madd
    clamp = (t_lo < lo) | (t_hi > hi)
    jit = _jit()
    if jit is not None:
        nans = _jit_parallel(jit.quantize_range, n, np.ascontiguousarray(x2).reshape(-1), m,
                             np.ascontiguousarray(inv, np.float32), madd, lo, hi, u)
        if sum(nans):
            raise CodecError("input contains NaN or Inf")
    elif _torch is not None and n >= _TORCH_MIN and ENGINE == "torch":
        tx = _torch.from_numpy(x2)
        ti = _torch.from_numpy(inv).reshape(g, 1)
        tm = _torch.from_numpy(madd).reshape(g, 1)
        tu = _torch.from_numpy(u2)
        tmp = _torch.from_numpy(np.empty(min(n, _CHUNK), np.float32))
        for r0, r1, c0, c1 in _blocks(g, m, _CHUNK):
            t = tmp[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            _torch.mul(tx[r0:r1, c0:c1], ti[r0:r1], out=t)
            t.add_(tm[r0:r1])
            t.clamp_(float(lo), float(hi))
            tu[r0:r1, c0:c1].copy_(t.view(_torch.int32))
    else:
        def kernel(r0, r1, c0, c1, tmp):
            t = tmp[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            np.multiply(x2[r0:r1, c0:c1], inv[r0:r1, None], out=t)
            np.add(t, madd[r0:r1, None], out=t)
            rows = np.flatnonzero(clamp[r0:r1])
            if rows.size:
                t[rows] = np.clip(t[rows], lo, hi)
            np.copyto(u2[r0:r1, c0:c1], t.view(np.uint32), casting="unsafe")

        _for_blocks(g, m, _NP_CHUNK, kernel)
    if big.any():  # rare: slices far from zero relative to their spread; exact float64 path
        for r in np.flatnonzero(big):
            p = (x2[r] * inv[r]).astype(np.float64)
            u2[r] = np.clip(np.rint(p + float(zu[r])), 0, levels).astype(np.uint8)
    return u


def _dequantize(u: np.ndarray, s: np.ndarray, zu: np.ndarray, shape, g: int) -> np.ndarray:
    """x' = fl(fl(u - zu) * s) per group (= s * (q - z)); ``u`` flat uint8 of n values.

    One multiply by ``s`` last: the result is bounded by the overflow check on (s, z), so no
    intermediate can overflow even for values near the float32 limit."""
    n = math.prod(shape)
    m = n // g
    out = np.empty(shape, np.float32)
    o2 = out.reshape(g, m)
    u2 = u[:n].reshape(g, m)
    jit = _jit()
    if jit is not None:
        _jit_parallel(jit.dequantize_range, n, u[:n], m, np.ascontiguousarray(s, np.float32),
                      np.ascontiguousarray(zu, np.float32), out.reshape(-1))
    elif _torch is not None and n >= _TORCH_MIN and ENGINE == "torch":
        to = _torch.from_numpy(o2)
        with warnings.catch_warnings():  # u may be a read-only view of the payload; never written
            warnings.simplefilter("ignore")
            tu = _torch.from_numpy(u2)
        ts = _torch.from_numpy(s).reshape(g, 1)
        tz = _torch.from_numpy(zu).reshape(g, 1)
        for r0, r1, c0, c1 in _blocks(g, m, _CHUNK):
            o = to[r0:r1, c0:c1]
            o.copy_(tu[r0:r1, c0:c1])
            o.sub_(tz[r0:r1])
            o.mul_(ts[r0:r1])
    else:
        def kernel(r0, r1, c0, c1, tmp):
            o = o2[r0:r1, c0:c1]
            np.copyto(o, u2[r0:r1, c0:c1])
            np.subtract(o, zu[r0:r1, None], out=o)
            np.multiply(o, s[r0:r1, None], out=o)

        _for_blocks(g, m, _NP_CHUNK, kernel)
    return out


def _pack(u: np.ndarray, n: int, bits: int) -> np.ndarray:
    """``pack_bits(u, bits)[:packed_len(n, bits)]`` for the quantized values ``u`` (flat, zero
    padded to a multiple of 8). Widths that divide a byte (1, 2, 4, 8) keep numpy's word-wide
    shifts (already near memory speed); the others (3, 5, 6, 7), where numpy assembles 64-bit
    words in eight passes, are compiled and split across threads when numba runs
    (``_jit.pack_groups``, the same bytes: 3x faster at 3 bits)."""
    jit = _jit()
    if jit is None or bits in _BYTE_WIDTHS or n < _TORCH_MIN or u.size % 8:
        return pack_bits(u, bits)[: packed_len(n, bits)]
    groups = u.size // 8
    out = scratch(groups * bits)
    run_parallel(lambda a, b: jit.pack_groups(u, bits, a, b, out), groups,
                 min_per_part=1 << 15)
    return out[: packed_len(n, bits)]


def _unpack(p: np.ndarray, n: int, bits: int) -> np.ndarray:
    """``unpack_bits(p, n, bits)``; for the widths :func:`_pack` compiles, the whole groups of 8
    values by ``_jit.unpack_groups`` across threads, the last partial group by numpy."""
    jit = _jit()
    if jit is None or bits in _BYTE_WIDTHS or n < _TORCH_MIN:
        return unpack_bits(p, n, bits)
    full = n // 8
    u = np.empty(n, np.uint8)
    run_parallel(lambda a, b: jit.unpack_groups(p, bits, a, b, u), full,
                 min_per_part=1 << 15)
    if n > 8 * full:  # the tail starts on a byte boundary: 8 * full * bits bits
        u[8 * full:] = unpack_bits(p[full * bits:], n - 8 * full, bits)
    return u


def _zero_width(z: np.ndarray) -> int:
    lo, hi = (int(z.min()), int(z.max())) if z.size else (0, 0)
    for w in (1, 2, 4):
        if -(1 << (8 * w - 1)) <= lo and hi < (1 << (8 * w - 1)):
            return w
    raise CodecError("affine zero-point out of int32 range")  # pragma: no cover - bounded by design


def quantize_groups(x2: np.ndarray, bits: int):
    """Quantize a (g, m) float32 array: returns ``(scales f32[g], zeros i64[g], u uint8 flat)``."""
    g, m = x2.shape
    jit = _jit()
    if m > 0 and g > 1 and x2.size >= _TORCH_MIN and jit is not None:
        return _quantize_short_rows(jit, np.ascontiguousarray(x2), bits)
    mn, mx = _row_minmax(x2)
    if not (np.isfinite(mn).all() and np.isfinite(mx).all()):
        raise CodecError("input contains NaN or Inf")
    s, z = affine_params(mn, mx, bits)
    if _overflow_bound(s, z, bits) > _OVERFLOW_LIMIT:
        raise CodecError("values too close to the float32 limit for affine quantization")
    qmin = -(1 << (bits - 1))
    const = mn == mx
    s_kernel = np.where(const, np.float32(1.0), s)
    inv = (np.float32(1.0) / s_kernel).astype(np.float32)
    zu = z - qmin
    u = _quantize(x2, inv, np.where(const, 0, zu), bits, mn, mx)
    if const.any():  # constant slices: q = z + K*sign(c) (see module docstring), set directly
        m = x2.shape[1]
        u2 = u[: x2.size].reshape(-1, m)
        c = mn[const]
        u2[const] = np.where(c > 0, (1 << bits) - 1, 0).astype(np.uint8)[:, None]
    return s, z, u


def _quantize_short_rows(jit, x2: np.ndarray, bits: int):
    """:func:`quantize_groups` of a tensor of several rows (lora_B slices of r values, lora_A
    rows of a layer's width, any matrix) by one compiled pass per row range
    (``_jit.affine_rows``): each row's min/max, parameters and values while it is in L1/L2,
    where the general path makes five passes over per-row arrays in numpy (2-3x slower on
    short, long and matrix rows alike). The same operations, so the same bytes
    (tests/test_codecs.py compares the two)."""
    g, m = x2.shape
    n = g * m
    u = scratch(n + (-n) % 8)
    u[n:] = 0
    s = np.empty(g, np.float32)
    z = np.empty(g, np.int64)
    flags = run_parallel(lambda a, b: jit.affine_rows(x2, bits, a, b, s, z, u), g,
                         min_per_part=max(1, (1 << 17) // m))
    if any(f & 1 for f in flags):
        raise CodecError("input contains NaN or Inf")
    if any(f & 2 for f in flags):
        raise CodecError("values too close to the float32 limit for affine quantization")
    return s, z, u


@register
class Affine(ValueCoder):
    """Per-slice affine quantization to ``bits`` bits (see the module docstring)."""

    codec_id = "affine"

    def __init__(self, bits: int = 8):
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
            raise SpecError(f"affine bit width must be an integer in 1..8, got {bits!r}")
        self.bits = int(bits)

    @classmethod
    def from_args(cls, args):
        if len(args) != 1 or not re.fullmatch(r"[0-9]+", args[0]):
            raise SpecError("affine takes one integer bit width in 1..8, e.g. affine:4")
        return cls(int(args[0]))

    def spec_part(self):
        return f"affine:{self.bits}"

    def get_config(self):
        return {"id": self.codec_id, "bits": self.bits}

    @classmethod
    def from_config(cls, cfg):
        cls.check_config_keys(cfg, ("bits",))
        return cls(cfg.get("bits", 8))

    def max_expansion(self):
        return 32.0 / self.bits  # b bits in per float32 out (raw 1-D tensors: 1)

    # -- sizes ------------------------------------------------------------------------------
    def values_size(self, x, groups):
        n = x.size
        if groups == 0:
            return _RAW.values_size(x, groups)
        x2 = x.reshape(groups, -1)
        mn, mx = _row_minmax(x2)
        if not (np.isfinite(mn).all() and np.isfinite(mx).all()):
            raise CodecError("input contains NaN or Inf")
        _, z = affine_params(mn, mx, self.bits)
        return 1 + groups * (4 + _zero_width(z)) + packed_len(n, self.bits)

    def max_values_size(self, n, groups):
        if groups == 0:
            return _RAW.max_values_size(n, groups)
        return 1 + 8 * groups + packed_len(n, self.bits)

    # -- encode -----------------------------------------------------------------------------
    def encode_values(self, x, groups, out):
        if groups == 0:
            _RAW.encode_values(x, groups, out)
            return
        x2 = x.reshape(groups, -1)
        s, z, u = quantize_groups(x2, self.bits)
        zw = _zero_width(z)
        out.append(bytes([zw]))
        out.append(as_bytes(s.astype("<f4")))
        out.append(as_bytes(z.astype(f"<i{zw}")))
        out.append(as_bytes(_pack(u, x.size, self.bits)))

    # -- decode -----------------------------------------------------------------------------
    def decode_values(self, r: Reader, shape, groups, name):
        return self.read_section(r, shape, groups, name).values(shape)

    def read_flat(self, r: Reader, table):
        return read_flat_sections(r, table, self.bits)

    def read_section(self, r: Reader, shape, groups, name):
        """The section checked (parameters, padding bits) without forming the values: an
        :class:`AffineSection` (a :class:`DenseSection` of raw float32 when ``groups == 0``)."""
        n = math.prod(shape)
        b = self.bits
        if groups == 0:
            return _RAW.read_section(r, shape, groups, name)
        if groups <= 0 or n % groups:
            raise CodecError(f"tensor {name!r}: {n} values do not split into {groups} slices")
        zw = r.u8(f"zero-point width of {name!r}")
        if zw not in (1, 2, 4):
            raise CodecError(f"tensor {name!r}: zero-point width {zw} is not 1, 2 or 4")
        need = groups * (4 + zw) + packed_len(n, b)
        if need > r.remaining:
            raise CodecError(f"truncated payload: affine section of {name!r} needs {need} bytes, "
                             f"{r.remaining} left")
        s = r.array("<f4", groups, f"scales of {name!r}").astype(np.float32)
        z = r.array(f"<i{zw}", groups, f"zero-points of {name!r}")  # read-only view
        jit = _jit() if groups <= _PARAM_BLOCK else None
        if jit is not None:  # one compiled pass (a server reads thousands of sections a round)
            zu = np.empty(groups, np.float32)
            ok, bound = jit.affine_section_params(s, z, b, zu)
        else:
            ok = float(s.min()) > 0 and float(s.max()) < math.inf  # (NaN fails both)
            bound = _overflow_bound(s, z, b) if ok else 0.0
        if not ok:
            raise CodecError(f"tensor {name!r}: non-finite or non-positive affine scale")
        if bound > _OVERFLOW_LIMIT:
            raise CodecError(f"tensor {name!r}: affine parameters overflow float32")
        if jit is None:
            zu = _zero_offsets(z, -(1 << (b - 1)))
        nb = packed_len(n, b)
        p = r.array("u1", nb, f"packed values of {name!r}")
        used = n * b - 8 * (nb - 1)
        if nb and used < 8 and int(p[-1]) >> used:
            raise CodecError(f"tensor {name!r}: non-zero padding bits in packed values")
        return AffineSection(s, zu, p, n, groups, b)


def read_flat_sections(r: Reader, table, bits: int) -> "FlatDense | None":
    """:meth:`ValueCoder.read_flat` for ``affine:bits`` (``bits == 0``: ``fp32``): the rest of
    ``r`` checked by one compiled pass (``_jit.scan_affine``: every check ``read_section``
    makes) into a :class:`FlatDense`; None, with ``r`` unread, without numba or when the pass
    refuses the body."""
    jit = _jit()
    if jit is None:
        return None
    ns = np.array([math.prod(shape) for _, shape in table], np.int64)
    groups = np.array([slice_groups(shape) if bits else 0 for _, shape in table], np.int64)
    total = int(groups.sum())
    S, ZU = np.empty(total, np.float32), np.empty(total, np.float32)
    offs, gofs = np.zeros(ns.size, np.int64), np.zeros(ns.size, np.int64)
    buf = np.frombuffer(r.buf, np.uint8)
    if not jit.scan_affine(buf, r.pos, r.end, ns, groups, bits, _OVERFLOW_LIMIT, S, ZU, offs,
                           gofs):
        return None
    r.pos = r.end
    return FlatDense([name for name, _ in table], ns, groups, bits, buf, offs, gofs, S, ZU)


class AffineSection(Section):
    """A checked ``affine:b`` section: value ``i`` is ``fl(fl(u_i - zu[r]) * s[r])`` with ``u_i``
    the ``b``-bit field ``i`` of ``p`` (LSB-first) and ``r = i // (n / groups)``; every such value
    is finite (the overflow check)."""

    kind = "affine"

    def __init__(self, s, zu, p, n: int, groups: int, bits: int) -> None:
        self.s, self.zu, self.p = s, zu, p
        self.n, self.groups, self.bits = n, groups, bits

    def values(self, shape):
        return _dequantize(_unpack(self.p, self.n, self.bits), self.s, self.zu, shape,
                           self.groups)


class FlatDense:
    """The checked value sections of one dense payload, in flat arrays (what
    :meth:`ValueCoder.read_flat` gives): tensor ``t`` (``names[t]``, ``ns[t]`` values, in the
    payload's table order) is raw float32 at ``buf[offs[t]:]`` when ``groups[t] == 0`` or
    ``bits == 0``, else ``affine:bits`` packed values at ``buf[offs[t]:]`` with its
    ``groups[t]`` scales ``S[gofs[t]:]`` and zero offsets ``ZU[gofs[t]:]`` (as
    :class:`AffineSection`). ``buf``: the payload as uint8, the memory the offsets
    point into."""

    kind = "dense-flat"

    def __init__(self, names, ns, groups, bits, buf, offs, gofs, S, ZU) -> None:
        self.names, self.ns, self.groups, self.bits = names, ns, groups, bits
        self.buf, self.offs, self.gofs, self.S, self.ZU = buf, offs, gofs, S, ZU

    @classmethod
    def of(cls, names, sections, buf: np.ndarray) -> "FlatDense":
        """The same form from sections read one by one (views of ``buf``): a body the compiled
        pass refused and :meth:`ValueCoder.read_section` accepted (none is known). The bit
        width is the affine sections' (one value coder wrote them all; 0 when none is)."""
        bits = next((s.bits for s in sections.values() if s.kind == "affine"), 0)
        base = buf.ctypes.data
        ns, groups, offs, S, ZU = [], [], [], [], []
        for name in names:
            sec = sections[name]
            ns.append(sec.n)
            if sec.kind == "affine":
                groups.append(sec.groups)
                offs.append(sec.p.ctypes.data - base)
                S.append(sec.s)
                ZU.append(sec.zu)
            else:
                groups.append(0)
                offs.append(np.asarray(sec.x).ctypes.data - base)
        groups = np.array(groups, np.int64)
        gofs = np.concatenate([[0], np.cumsum(groups)[:-1]]).astype(np.int64)
        cat = (lambda a: np.concatenate(a).astype(np.float32) if a else np.zeros(0, np.float32))
        return cls(list(names), np.array(ns, np.int64), groups, bits, buf,
                   np.array(offs, np.int64), gofs, cat(S), cat(ZU))

    def sections(self) -> "dict[str, Section]":
        """The same sections as ``{name: Section}`` (:meth:`ValueCoder.read_section`'s form)."""
        out = {}
        for t, name in enumerate(self.names):
            n, g, o = int(self.ns[t]), int(self.groups[t]), int(self.offs[t])
            if self.bits == 0 or g == 0:
                out[name] = DenseSection(self.buf[o:o + 4 * n].view("<f4"))
            else:
                go = int(self.gofs[t])
                out[name] = AffineSection(self.S[go:go + g], self.ZU[go:go + g],
                                          self.buf[o:o + (n * self.bits + 7) // 8], n, g,
                                          self.bits)
        return out


@register
class Fp32(_FixedWidth):
    """Raw little-endian float32 (lossless)."""

    codec_id = "fp32"

    def encode_values(self, x, groups, out):
        check_finite(x)
        out.append(as_bytes(np.ascontiguousarray(x, dtype="<f4")))

    def decode_values(self, r: Reader, shape, groups, name):
        return self.read_section(r, shape, groups, name).values(shape)

    def read_section(self, r: Reader, shape, groups, name):
        raw = r.array("<f4", math.prod(shape), f"fp32 values of {name!r}")
        check_finite(raw, f"tensor {name!r} (fp32 values)")
        return DenseSection(raw)  # a view of the payload: DenseSection.values copies it

    def read_flat(self, r: Reader, table):
        return read_flat_sections(r, table, 0)


_RAW = Fp32()  # the value section of an ungrouped (1-D) tensor: raw float32
