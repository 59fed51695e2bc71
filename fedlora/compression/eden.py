"""``drive`` and ``eden:b`` — randomized-Hadamard rotation, then 1 (DRIVE) or ``b`` (EDEN) bits a
rotated value, one scale a chunk; below one bit by shared-seed subsampling (no indices travel).

DRIVE (Vargaftik et al., NeurIPS 2021) and EDEN (ICML 2022). The update, every tensor flattened
and concatenated in body order, is cut into chunks (``rotate.chunk_plan``), rotated, quantized to
sign (1 bit) or the Lloyd–Max quantizer of N(0, 1) (2..4 bits), and sent as labels with one
scale a chunk. ``drive`` / ``eden:b``: unbiased scale; ``:mse``: least-squares scale (biased,
contractive: for error feedback); ``eden:p`` (0 < p < 1): one value a stratum, positions from
the key; ``:tensor`` (last): each tensor first divided by its RMS rounded to a power of two.
Rotation signs and positions come from the pipeline's codec key (:func:`codec_key`), derived by
both ends and never sent; a :class:`~.payload.Pipeline` without one refuses to encode or decode.
``max_expansion``: 32/b. Decoding needs numba (a dependency).

Scales, error figures and the body layout: docs/wire-format.md (``drive`` and ``eden:b``);
design and measurements: docs/codecs-subbit.md.
"""

from __future__ import annotations

import hashlib
import math
import re
from decimal import Decimal, InvalidOperation

import numpy as np

from .arrays import FLT_MAX, as_bytes
from .binary import Reader
from .codec import ValueCoder, register
from .errors import CodecError, SpecError
from .runtime import run_parallel, scratch

__all__ = ["Eden", "Drive", "CENTROIDS", "codec_key"]

#: Lloyd–Max centroids of N(0, 1), positive half (computed by Lloyd's iteration on the normal
#: density; written out so that every machine decodes the same float32 bits). 1 bit: +-1 (the
#: scale absorbs E|z|).
CENTROIDS = {
    1: (1.0,),
    2: (0.4527800381183624, 1.5104175806045532),
    3: (0.2450941801071167, 0.7560052871704102, 1.3439092636108398, 2.1519455909729004),
    4: (0.12839503586292267, 0.38804829120635986, 0.6567591428756714, 0.9423404335975647,
        1.2562311887741089, 1.6180464029312134, 2.069017171859741, 2.7325894832611084),
}
_LIMIT = FLT_MAX * (1.0 - 2.0 ** -20)
_MIN_P = Decimal("0.001")
_PART = 4  # chunks per unit of parallel work
_FLAGS = ([], ["mse"], ["tensor"], ["mse", "tensor"])
_ZERO_TENSOR = -128  # ``:tensor`` exponent of a tensor of zeros


def codec_key(run_seed: int, server_round: int, direction: str, node: int | None = None) -> int:
    """The 64-bit codec key of one message, derived by both ends: BLAKE2b of the run seed, the
    round, the direction (``"up"``: a node's upload, with its node id; ``"down"``: the round's
    downloads, one payload shared by the nodes that hold the same copy) and the node id."""
    text = (f"fedlora-codec-key/1|{int(run_seed)}|{int(server_round)}|{direction}|"
            f"{'' if node is None else int(node)}")
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _pow2(e: int) -> np.float32:
    """``2^e`` as a float32 (exact for ``e`` in [-149, 127]): multiplying by it rounds once, as
    ``np.ldexp`` does, subnormal results included (``tests/test_subbit_golden.py``)."""
    return np.float32(math.ldexp(1.0, e))


def _tables(bits: int):
    half = np.array(CENTROIDS[bits], np.float32)
    cents = np.concatenate([-half[::-1], half]).astype(np.float32)
    bounds = ((cents[:-1].astype(np.float64) + cents[1:]) / 2).astype(np.float32)
    return cents, bounds


def _kernels():
    try:
        from . import rotate
    except ImportError as err:  # pragma: no cover - numba is a dependency
        raise CodecError(f"drive/eden need numba ({err})") from None
    return rotate


@register
class Eden(ValueCoder):
    """EDEN: rotated ``b``-bit quantization, below 1 bit by shared-seed subsampling."""

    codec_id = "eden"
    for_updates_only = True
    whole_body = True
    needs_key = True

    def __init__(self, bits: str | float | int = 1, mse: bool = False, tensor: bool = False):
        try:
            d = Decimal(str(bits))
        except InvalidOperation:
            raise SpecError(f"eden bit width must be a number, got {bits!r}") from None
        if not (d.is_finite() and ((_MIN_P <= d < 1 and d.as_tuple().exponent >= -6)
                                   or d in (1, 2, 3, 4))):
            raise SpecError(f"eden bit width must be 1, 2, 3, 4 or in [0.001, 1) with at most "
                            f"6 decimals, got {bits!r}")
        self.p = d if d < 1 else None          # the sampled fraction below one bit
        self.bits = int(d) if d >= 1 else 1     # label width
        self.text = format(d.normalize(), "f")
        self.mse = bool(mse)
        self.tensor = bool(tensor)
        self.cents, self.bounds = _tables(self.bits)

    @classmethod
    def from_args(cls, args):
        if len(args) >= 1 and re.fullmatch(r"[0-9]*\.?[0-9]+", args[0]) and \
                args[1:] in _FLAGS:
            return cls(args[0], mse="mse" in args[1:], tensor="tensor" in args[1:])
        raise SpecError("eden takes a bit width (1..4, or below 1: the sampled fraction), then "
                        "optionally 'mse' (least-squares scale) and 'tensor' (tensors equalized "
                        "to one RMS), e.g. eden:2, eden:0.25:mse, eden:0.5:mse:tensor")

    def _flags(self) -> str:
        return (":mse" if self.mse else "") + (":tensor" if self.tensor else "")

    def spec_part(self):
        return f"eden:{self.text}" + self._flags()

    def get_config(self):
        return {"id": self.codec_id, "bits": self.text, "mse": self.mse, "tensor": self.tensor}

    @classmethod
    def _bool_config(cls, cfg):
        out = []
        for k in ("mse", "tensor"):
            v = cfg.get(k, False)
            if not isinstance(v, bool):
                raise SpecError(f"{cls.codec_id}: {k} must be true or false, got {v!r}")
            out.append(v)
        return out

    @classmethod
    def from_config(cls, cfg):
        cls.check_config_keys(cfg, ("bits", "mse", "tensor"))
        return cls(cfg.get("bits", 1), *cls._bool_config(cfg))

    def max_expansion(self):
        return 32.0 / float(self.p if self.p is not None else self.bits)

    # -- layout ---------------------------------------------------------------------------
    def kept(self, n: int) -> int:
        """How many values travel (``n``, or ``ceil(p n)`` below one bit)."""
        if self.p is None or n == 0:
            return n
        num, den = self.p.as_integer_ratio()
        return max(1, -(-n * num // den))

    def body_size(self, sizes: list[int]) -> int:
        """Bytes of the body for tensors of ``sizes`` values."""
        starts, chunks = _kernels().chunk_plan(self.kept(sum(sizes)))
        padded = int(chunks.sum())
        return (4 + len(sizes) * self.tensor + 4 * chunks.size
                + (padded * self.bits + 7) // 8)

    def _wmax(self, n: int) -> int:
        k = self.kept(n)
        return -(-n // k) if (self.p is not None and not self.mse and k) else 1

    # -- encode -----------------------------------------------------------------------------
    def encode_body(self, items, key, out) -> None:
        rot = _kernels()
        if key is None:
            raise CodecError(f"{self.spec_part()} needs a codec key (the pipeline's: "
                             "Pipeline.keyed)")
        n = sum(x.size for _, x in items)
        out.append(np.array([rot.key_tag(key)], "<u4").tobytes())
        if self.tensor:
            exps = self._tensor_exponents(rot, items)
            out.append(as_bytes(exps))
        if n == 0:
            return
        if len(items) == 1 and not self.tensor:
            x = items[0][1].reshape(-1)
        else:
            x = scratch(4 * n).view(np.float32)
            o = 0
            for i, (_, t) in enumerate(items):
                xs = x[o:o + t.size]
                if not self.tensor:
                    xs[...] = t.reshape(-1)
                elif exps[i] == _ZERO_TENSOR:
                    xs[...] = 0.0
                else:  # times 2^-e (a float32 for e in [-127, 127]): np.ldexp's bits, 2x as fast
                    np.multiply(t.reshape(-1), _pow2(-int(exps[i])), out=xs)
                o += t.size
        k64 = np.uint64(key)
        sample = self.p is not None  # the kept values are gathered chunk by chunk
        m = self.kept(n)
        starts, sizes = rot.chunk_plan(m)
        T = np.empty(sizes.size, np.float32)
        padded = int(sizes.sum())
        packed = scratch((padded * self.bits + 7) // 8)
        wmax = float(self._wmax(n))
        flags = run_parallel(
            lambda a, b: rot.encode_chunks(x, m, starts, sizes, k64, self.bits, self.bounds,
                                           self.cents, not self.mse, wmax, _LIMIT, a, b, T,
                                           packed, n, sample),
            sizes.size, min_per_part=_PART)
        if any(f & 1 for f in flags):
            raise CodecError("input contains NaN or Inf")
        cbound = float((T.astype(np.float64) * sizes).max()) * float(abs(self.cents[-1])) * wmax
        if any(f & 2 for f in flags) or (self.tensor and math.ldexp(cbound, int(exps.max()))
                                          > _LIMIT):
            raise CodecError(f"values too close to the float32 limit for {self.spec_part()}")
        out.append(as_bytes(T.astype("<f4")))
        out.append(as_bytes(packed))

    @staticmethod
    def _tensor_exponents(rot, items) -> np.ndarray:
        """``:tensor``: each tensor's RMS rounded to a power of two ``2^e`` (int8 ``e`` in
        [-127, 127]; -128: a tensor of zeros); each travels divided by it."""
        exps = np.full(len(items), _ZERO_TENSOR, np.int8)
        for i, (_, t) in enumerate(items):
            ss = rot._sumsq8(t.reshape(-1)) if t.size else 0.0
            if not ss < np.inf:
                raise CodecError("input contains NaN or Inf")
            if ss > 0:
                mant, e = math.frexp(math.sqrt(ss / t.size))
                exps[i] = min(127, max(-127, e - (mant < math.sqrt(0.5))))
        return exps

    # -- decode -----------------------------------------------------------------------------
    def decode_body(self, r: Reader, table, key) -> dict[str, np.ndarray]:
        rot = _kernels()
        name = self.spec_part()
        if key is None:
            raise CodecError(f"{name} payload needs the codec key to decode (the pipeline's: "
                             "Pipeline.keyed / decode_payload(key=...))")
        n = sum(math.prod(shape) for _, shape in table)
        if r.remaining < 4 + len(table) * self.tensor:
            raise CodecError(f"truncated payload: {name} body of {r.remaining} bytes")
        tag = int(r.array("<u4", 1, f"{name} key tag")[0])
        want = rot.key_tag(key)
        if tag != want:
            raise CodecError(f"{name} payload carries codec key tag {tag:08x}, this receiver "
                             f"expects {want:08x}: sender and receiver derived different codec "
                             "keys (run seed, round, direction or node differ)")
        exps = None
        if self.tensor:  # every int8 is valid: -128 a tensor of zeros, else 2^e
            exps = r.array("i1", len(table), f"{name} tensor exponents").astype(np.int64)
        m = self.kept(n)
        starts, sizes = rot.chunk_plan(m)
        padded = int(sizes.sum())
        nbytes = (padded * self.bits + 7) // 8
        need = 4 * sizes.size + nbytes
        if need > r.remaining:  # before anything of the declared size is allocated
            raise CodecError(f"truncated payload: {name} body needs {need} bytes, "
                             f"{r.remaining} left")
        flat = np.empty(n, np.float32)  # every value is written (sub-bit: 0 off the sample)
        if n:
            T = r.array("<f4", sizes.size, f"{name} scales").astype(np.float32)
            cmax = float(abs(self.cents[-1]))
            with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf are refused below
                bound = T.astype(np.float64) * sizes * cmax * self._wmax(n)
                if exps is not None and exps.size:
                    bound = bound * 2.0 ** int(exps.max())
            if not (np.all(T >= 0) and np.all(bound <= _LIMIT)) or np.signbit(T).any():
                raise CodecError(f"{name}: negative, non-finite or overflowing chunk scale")
            packed = r.array("u1", nbytes, f"{name} labels")
            used = padded * self.bits - 8 * (nbytes - 1)
            if used < 8 and int(packed[-1]) >> used:
                raise CodecError(f"{name}: non-zero padding bits after the labels")
            k64 = np.uint64(key)
            bad = run_parallel(
                lambda a, b: rot.decode_chunks(packed, m, starts, sizes, k64, self.bits,
                                               self.cents, T, a, b, flat, n,
                                               self.p is not None, not self.mse),
                sizes.size, min_per_part=_PART)
            if any(bad):
                raise CodecError(f"{name}: non-zero labels in a chunk of scale 0")
        if exps is not None:
            o = 0
            for i, (_, shape) in enumerate(table):
                size = math.prod(shape)
                if exps[i] == _ZERO_TENSOR:
                    flat[o:o + size] = 0.0
                else:
                    np.multiply(flat[o:o + size], _pow2(int(exps[i])), out=flat[o:o + size])
                o += size
        out, o = {}, 0
        for tname, shape in table:
            size = math.prod(shape)
            out[tname] = flat[o:o + size].reshape(shape)
            o += size
        return out

    # the per-tensor hooks of a ValueCoder: this coder codes the whole body (``whole_body``)
    def encode_values(self, x, groups, out):  # pragma: no cover - never called
        raise NotImplementedError(f"{self.spec_part()} codes the whole body")

    def values_size(self, x, groups):  # pragma: no cover - never called
        raise NotImplementedError(f"{self.spec_part()} codes the whole body")

    def max_values_size(self, n, groups):  # pragma: no cover - never called
        raise NotImplementedError(f"{self.spec_part()} codes the whole body")

    def decode_values(self, r, shape, groups, name):  # pragma: no cover - never called
        raise NotImplementedError(f"{self.spec_part()} codes the whole body")


@register
class Drive(Eden):
    """DRIVE: ``eden:1`` under its own name (the same body, bits and values)."""

    codec_id = "drive"

    def __init__(self, mse: bool = False, tensor: bool = False):
        super().__init__(1, mse, tensor)

    @classmethod
    def from_args(cls, args):
        if args in _FLAGS:
            return cls(mse="mse" in args, tensor="tensor" in args)
        raise SpecError("drive takes no argument, or 'mse' (least-squares scale) and/or "
                        "'tensor' (tensors equalized to one RMS): drive, drive:mse, "
                        "drive:mse:tensor")

    def spec_part(self):
        return "drive" + self._flags()

    def get_config(self):
        return {"id": self.codec_id, "mse": self.mse, "tensor": self.tensor}

    @classmethod
    def from_config(cls, cfg):
        cls.check_config_keys(cfg, ("mse", "tensor"))
        return cls(*cls._bool_config(cfg))
