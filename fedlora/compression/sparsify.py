"""``topk:d`` / ``topk:d:tensor`` — FLASC's magnitude top-k, plus the compact index codings.

Keeps ``k = floor(d * N)`` entries of largest ``|x|`` globally across all tensors of the message
(FLASC) or, with ``:tensor``, ``floor(d * N_t)`` per tensor; ties go to the lower position, so
exactly ``k`` are kept, deterministically. Each tensor's section is its kept count, then a
bitmap or gap varints (whichever is smaller; never raw int64), then the value coder's section
for the kept values in index order. Decoding zero-fills the dropped entries and refuses a gap
section not smaller than the bitmap. ``max_expansion``: ``2/d``.

The section layout: docs/wire-format.md (``topk:d``); how the selection is made fast (and
exact whatever the sample): docs/codecs.md ("Implementation notes").
"""

from __future__ import annotations

import math
import re

import numpy as np

from .arrays import as_bytes, check_finite, to_float32
from .binary import (Reader, leb128_decode, leb128_encode, pack_bitmap, unpack_bitmask, uvarint,
                     uvarint_len)
from .codec import Section, Sparsifier, register
from .errors import CodecError, SpecError
from .runtime import run_parallel, scratch_arrays

__all__ = ["FlatSparse", "SparseSection", "TopK", "topk_mask", "topk_indices", "topk_select"]

_EXACT_MAX = 1 << 15   # below this many elements: one stable argsort
_SAMPLE = 1 << 16
_CHUNK = 1 << 18
_FMAX = np.float32(np.finfo(np.float32).max)
_SCATTER_BLOCK = 1 << 16


# ------------------------------------------------------------------------------------------
# index coding (the gap varints and bitmaps themselves: ``binary.py``)


def gaps_of(idx: np.ndarray) -> np.ndarray:
    g = np.empty(idx.size, np.int64)
    if idx.size:
        g[0] = idx[0]
        np.subtract(idx[1:], idx[:-1], out=g[1:])
        g[1:] -= 1
    return g


def _scatter(flat: np.ndarray, where: np.ndarray, vals: np.ndarray) -> None:
    """``flat[where] = vals`` for sorted indices or a bool mask; a mask is turned into indices
    one block at a time (as fast as one index array, without its 8 bytes per kept entry)."""
    if where.dtype != np.bool_:
        flat[where] = vals
        return
    pos = 0
    for c0 in range(0, where.size, _SCATTER_BLOCK):
        i = np.flatnonzero(where[c0:c0 + _SCATTER_BLOCK])
        flat[c0:c0 + _SCATTER_BLOCK][i] = vals[pos:pos + i.size]
        pos += i.size


def _index_choice(idx: np.ndarray, n: int) -> tuple[int, int, np.ndarray | None]:
    """(mode, section bytes after the mode byte, encoded gap varints or None)."""
    bitmap = (n + 7) // 8
    if idx.size >= bitmap:  # >= one varint byte per index: the bitmap cannot lose
        return 0, bitmap, None
    enc = leb128_encode(gaps_of(idx))
    varint = uvarint_len(enc.size) + enc.size
    if varint < bitmap:
        return 1, varint, enc
    return 0, bitmap, None


# ------------------------------------------------------------------------------------------
# selection


def _density_k(d: float, n: int) -> int:
    return min(n, int(math.floor(d * n)))


def _exact(flats: list[np.ndarray], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    a = np.abs(np.concatenate(flats)) if flats else np.zeros(0, np.float32)
    keep = np.sort(np.argsort(-a, kind="stable")[:k])
    out, off = [], 0
    for f in flats:
        lo, hi = np.searchsorted(keep, [off, off + f.size])
        idx = keep[lo:hi] - off
        out.append((idx, f[idx]))
        off += f.size
    return out


def _candidates(f: np.ndarray, t_lo: np.float32, frac: float | list[float] = 1.0):
    """Per cache-sized chunk of flat ``f`` (in order): indices, signed values and magnitudes of the
    entries with ``|x| >= t_lo`` (three lists of arrays; a chunk read by the compiled pass has
    None for its magnitudes: ``_kth_value`` and ``keep_at_least`` read them from the values'
    bits); rejects NaN/Inf. Split over the pool.

    ``frac`` (the expected kept fraction, or one per chunk) sizes one slot per chunk in the
    encode's scratch memory, taken here before the split (scratch is per thread); a chunk that
    overflows its slot gets fresh arrays. Fresh multi-MB arrays per encode cost more in page
    faults than the selection."""
    if f.size == 0:
        return [], [], []
    nchunks = -(-f.size // _CHUNK)
    caps = []
    for c in range(nchunks):
        m = min(_CHUNK, f.size - c * _CHUNK)
        fr = frac[c] if isinstance(frac, list) else frac
        # dense selections (the sample-missed fallback): no slots, fresh arrays
        caps.append(min(m, int(fr * m * 1.25) + 8 * int(math.sqrt(m)) + 256)
                    if fr <= 0.5 else 0)
    jit = _jit_kernels()
    idx_all, val_all, *mag_all = scratch_arrays(sum(caps), np.int64, np.float32,
                                                *([np.float32] if jit is None else []))
    mag_all = mag_all[0] if mag_all else None
    offs = np.concatenate([[0], np.cumsum(caps)]).tolist()
    t_bits = _bits(t_lo)

    def part(lo, hi):
        tmp = np.empty(min(_CHUNK, f.size), np.float32) if jit is None else None
        out = ([], [], [])
        for c in range(lo, hi):
            c0 = c * _CHUNK
            c1 = min(f.size, c0 + _CHUNK)
            src = f[c0:c1]
            if jit is not None:  # one compiled pass, same entries (magnitudes: None)
                ii, vv = idx_all[offs[c]:offs[c + 1]], val_all[offs[c]:offs[c + 1]]
                n_i = jit.candidates(src.view(np.int32), t_bits, c0, ii, vv.view(np.int32))
                if n_i == -2:  # more than the slot holds: fresh arrays, going on after it
                    n_i = ii.size
                    ii = np.concatenate([ii, np.empty(c1 - c0 - n_i, np.int64)])
                    vv = np.concatenate([vv, np.empty(c1 - c0 - n_i, np.float32)])
                    at = int(ii[n_i - 1]) + 1 if n_i else c0
                    more = jit.candidates(src[at - c0:].view(np.int32), t_bits, at,
                                          ii[n_i:], vv[n_i:].view(np.int32))
                    n_i = -1 if more < 0 else n_i + more
                if n_i < 0:
                    raise CodecError("input contains NaN or Inf")
                out[0].append(ii[:n_i])
                out[1].append(vv[:n_i])
                out[2].append(None)
                continue
            a = tmp[: c1 - c0]
            np.abs(src, out=a)
            if not a.max() <= _FMAX:
                raise CodecError("input contains NaN or Inf")
            i = np.flatnonzero(a >= t_lo)
            n_i = i.size
            if n_i <= caps[c]:
                s0 = offs[c]
                ii, vv, mm = (idx_all[s0:s0 + n_i], val_all[s0:s0 + n_i],
                              mag_all[s0:s0 + n_i])
                np.take(src, i, out=vv)
                np.take(a, i, out=mm)
                np.add(i, c0, out=ii)
            else:
                ii, vv, mm = i + c0, src[i], a[i]
            out[0].append(ii)
            out[1].append(vv)
            out[2].append(mm)
        return out

    res = run_parallel(part, nchunks, min_per_part=4)
    return tuple([x for r in res for x in r[j]] for j in range(3))


def _jit_kernels():
    """``_sparse_jit`` when the affine engine uses numba (``quantize._jit``), else None."""
    from .quantize import _jit

    if _jit() is None:
        return None
    from . import _sparse_jit

    return _sparse_jit


def _bitmap(idx: np.ndarray, n: int) -> np.ndarray:
    """``binary.pack_bitmap`` (the same bytes), by one compiled pass over the indices where
    numba runs the codecs."""
    jit = _jit_kernels()
    return pack_bitmap(idx, n) if jit is None else jit.pack_bitmap(idx, (n + 7) // 8)


def _kth_largest(v: np.ndarray, k: int) -> np.float32:
    return np.partition(v, v.size - k)[v.size - k]


def _bits(x) -> np.int32:
    """The bit pattern of the float32 ``x`` as an int32 (for ``x >= 0``: ordered as ``x``)."""
    return np.asarray(x, np.float32).view(np.int32)[()]


def _kth_value(cand, k: int, t_hi: np.float32, jit) -> np.float32:
    """The ``k``-th largest ``|x|`` among the candidates (which hold at least ``k``), looking
    only at those ``<= t_hi`` when fewer than ``k`` lie above it. ``jit``: the candidates'
    magnitudes are read from their values' bits by compiled passes (``cand``'s magnitude lists
    are not filled)."""
    if np.isfinite(t_hi):
        if jit is not None:
            n_vals = sum(x.size for c in cand for x in c[1])
            band = scratch_arrays(n_vals, np.int32)[0]
            above, nb, hb = 0, 0, _bits(t_hi)
            for x in (x for c in cand for x in c[1]):
                a, nb = jit.band(x.view(np.int32), hb, band, nb)
                above += a
            if above < k:
                return _kth_largest(band[:nb], k - above).view(np.float32)
        else:
            mags = [m for c in cand for m in c[2]]
            above = sum(int(np.count_nonzero(m > t_hi)) for m in mags)
            if above < k:
                band = np.concatenate([m[np.flatnonzero(m <= t_hi)] for m in mags])
                return _kth_largest(band, k - above)
    mags = [np.abs(x) for c in cand for x in c[1]]
    return _kth_largest(np.concatenate(mags), k)


def _shares(flats, samp, step: int, t_lo: np.float32, frac: float) -> list[list[float]]:
    """Per array, per ``_CHUNK`` of it: the share of its sample (``samp``: every array's
    ``|f[step // 2::step]|``, concatenated) at or above ``t_lo``, which sizes that chunk's
    scratch slot (a global top-k may take 3x the average share from one tensor, or from part of
    one, and none from another); ``frac`` where a chunk holds no sample."""
    out, at = [], 0
    for f in flats:
        m = f[step // 2:: step].size
        hit = samp[at:at + m] >= t_lo
        at += m
        shares = []
        for c0 in range(0, f.size, _CHUNK):  # sample j sits at step // 2 + j * step
            j0 = -(-(c0 - step // 2) // step)
            j1 = -(-(min(f.size, c0 + _CHUNK) - step // 2) // step)
            j0, j1 = max(0, j0), min(m, j1)
            shares.append(int(np.count_nonzero(hit[j0:j1])) / (j1 - j0) if j1 > j0 else frac)
        out.append(shares)
    return out


def topk_select(flats: list[np.ndarray], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per flat array: (sorted kept indices, their values), the ``k`` largest ``|x|`` over all
    arrays jointly (ties -> lower position). CodecError on NaN/Inf."""
    n = sum(f.size for f in flats)
    if k <= 0 or k >= n or n <= _EXACT_MAX:
        for f in flats:
            check_finite(f)
        if k <= 0 or n == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in flats]
        if k >= n:
            return [(np.arange(f.size, dtype=np.int64), f) for f in flats]
        return _exact(flats, k)
    # bracket the k-th largest |x| between two thresholds from a strided sample
    step = max(1, n // _SAMPLE)
    samp = np.abs(np.concatenate([f[step // 2:: step] for f in flats]))
    s = samp.size
    p = k / n
    sig = math.sqrt(s * p * (1 - p)) + 1.0
    r_lo = int(p * s + 6 * sig + 8)  # rank from the top: more elements -> lower threshold
    r_hi = int(p * s - 6 * sig - 8)
    kth = sorted({min(s - 1, max(0, s - r)) for r in (r_lo, r_hi)})
    part = np.partition(samp, kth)
    t_lo = np.float32(part[s - r_lo]) if r_lo <= s else np.float32(0.0)
    t_hi = np.float32(part[s - r_hi]) if r_hi >= 1 else np.float32(np.inf)
    frac = min(1.0, r_lo / s)
    cand = [_candidates(f, t_lo, fr) for f, fr in zip(flats, _shares(flats, samp, step, t_lo,
                                                                   frac))]
    if sum(a.size for c in cand for a in c[0]) < k:  # the sample missed: take every element
        cand = [_candidates(f, np.float32(0.0)) for f in flats]
    jit = _jit_kernels()
    v = _kth_value(cand, k, t_hi, jit)
    out = []
    for idxs, vals, ms in cand:
        if jit is not None:  # one compiled pass per candidate block, in order
            oi, ov = scratch_arrays(sum(i.size for i in idxs), np.int64, np.float32)
            pos, vb = 0, _bits(v)
            for i, x in zip(idxs, vals):
                pos = jit.keep_at_least(i, x.view(np.int32), vb, oi, ov.view(np.int32), pos)
            out.append([oi[:pos], ov[:pos]])
            continue
        keep = [np.flatnonzero(m >= v) for m in ms]
        kept = sum(j.size for j in keep)
        # the kept entries: inputs to the index and value coders
        oi, ov = scratch_arrays(kept, np.int64, np.float32)
        pos = 0
        for i, x, j in zip(idxs, vals, keep):
            np.take(i, j, out=oi[pos:pos + j.size])
            np.take(x, j, out=ov[pos:pos + j.size])
            pos += j.size
        out.append([oi, ov])
    excess = sum(o[0].size for o in out) - k
    for o in reversed(out):  # ties at the k-th value: drop the highest positions
        if excess <= 0:
            break
        eq = np.flatnonzero(np.abs(o[1]) == v)[-excess:]
        o[0], o[1] = np.delete(o[0], eq), np.delete(o[1], eq)
        excess -= eq.size
    return [(o[0], o[1]) for o in out]


def _cat(parts, dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def topk_indices(flats: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Sorted kept flat indices per array: the ``k`` largest ``|x|`` over all arrays jointly."""
    return [idx for idx, _ in topk_select(flats, k)]


def _select(items, density: float, per_tensor: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    flats = [x.reshape(-1) for _, x in items]
    if per_tensor:
        return [topk_select([f], _density_k(density, f.size))[0] for f in flats]
    return topk_select(flats, _density_k(density, sum(f.size for f in flats)))


def topk_mask(tensors, density: float, per_tensor: bool = False) -> dict[str, np.ndarray]:
    """Boolean keep-masks (same shapes) of the top-``density`` entries by ``|value|``, global across
    all tensors (FLASC's download mask by weight magnitude) or per tensor."""
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    items = [(name, to_float32(name, t)) for name, t in tensors.items()]
    out = {}
    for (name, x), (idx, _) in zip(items, _select(items, float(density), per_tensor)):
        m = np.zeros(x.shape, np.bool_)
        m.reshape(-1)[idx] = True
        out[name] = m
    return out


# ------------------------------------------------------------------------------------------
# the codec


@register
class TopK(Sparsifier):
    """Magnitude top-k (global across the message, or per tensor)."""

    codec_id = "topk"

    def __init__(self, density: float, per_tensor: bool = False):
        d = float(density)
        if not (math.isfinite(d) and 0.0 < d <= 1.0):
            raise SpecError(f"topk density must be in (0, 1], got {density!r}")
        self.density = d
        self.per_tensor = bool(per_tensor)

    @classmethod
    def from_args(cls, args):
        if not 1 <= len(args) <= 2:
            raise SpecError("topk takes a density and optionally 'tensor', e.g. topk:0.05")
        if not re.fullmatch(r"[0-9]*\.?[0-9]*(e[-+]?[0-9]+)?", args[0].lower()) or \
                not re.search(r"[0-9]", args[0]):
            raise SpecError(f"topk density {args[0]!r} is not a number")
        per = False
        if len(args) == 2:
            if args[1].lower() != "tensor":
                raise SpecError(f"unknown topk option {args[1]!r} (only 'tensor')")
            per = True
        return cls(float(args[0]), per)

    def spec_part(self):
        return f"topk:{self.density!r}" + (":tensor" if self.per_tensor else "")

    def get_config(self):
        return {"id": self.codec_id, "density": self.density, "per_tensor": self.per_tensor}

    @classmethod
    def from_config(cls, cfg):
        cls.check_config_keys(cfg, ("density", "per_tensor"))
        if "density" not in cfg:
            raise SpecError(f"topk config needs 'density' (and optional 'per_tensor'), got "
                            f"{sorted(cfg)}")
        return cls(cfg["density"], cfg.get("per_tensor", False))

    def max_expansion(self):
        # >= floor(d*N) >= d*N/2 values travel once d*N >= 1; below that the allowance applies
        return 2.0 / self.density

    # -- encode -----------------------------------------------------------------------------
    def _sections(self, items, vc, out, sizing: bool) -> int:
        size = 0
        for (name, x), (idx, vals) in zip(items, _select(items, self.density, self.per_tensor)):
            n, k = x.size, idx.size
            size += uvarint_len(k)
            head = [uvarint(k)]
            if 0 < k < n:
                mode, nbytes, enc = _index_choice(idx, n)
                size += 1 + nbytes
                head.append(bytes([mode]))
                if mode == 1:
                    head += [uvarint(enc.size), as_bytes(enc)]
                elif not sizing:
                    head.append(as_bytes(_bitmap(idx, n)))
            groups = 1 if (x.ndim >= 2 and k > 0) else 0
            if sizing:
                size += vc.values_size(vals, groups)
            else:
                out += head
                vc.encode_values(vals, groups, out)
        return size

    def encode_all(self, items, vc, out):
        self._sections(items, vc, out, sizing=False)

    def size_all(self, items, vc):
        return self._sections(items, vc, None, sizing=True)

    def max_size(self, name, shape, vc):
        n = math.prod(shape)
        groups = 1 if len(shape) >= 2 else 0
        return 10 + 1 + (n + 7) // 8 + vc.max_values_size(n, groups)

    # -- decode -----------------------------------------------------------------------------
    def decode_all(self, r: Reader, table, vc):
        jit = _jit_kernels()
        # fp32 values: the compiled reader (measured faster); affine ones: read_sparse, whose
        # vectorized dequantization was as fast or faster on the LoRA layout
        flat = (self.read_flat(r, table, vc, narrow=True)
                if jit is not None and vc.codec_id == "fp32" else None)
        if flat is None:
            return {name: sec.values(shape) for (name, shape), sec in
                    zip(table, self.read_sparse(r, table, vc).values())}
        ns, kept = flat.ns.tolist(), flat.kept.tolist()
        starts = np.concatenate([[0], np.cumsum(kept)]).tolist()

        def fill(t0, t1):  # tensors [t0, t1): each by one pass (the pool splits the tensors)
            out = []
            for n, j, k in zip(ns[t0:t1], starts[t0:t1], kept[t0:t1]):
                if k == n:
                    dense = flat.vals[j:j + k].copy()
                else:  # calloc'd: pages no value lands on are never touched
                    dense = np.zeros(n, np.float32)
                    jit.scatter(flat.idx[j:j + k], flat.vals[j:j + k], dense)
                out.append(dense)
            return out

        dense = [d for part in run_parallel(fill, len(table), min_per_part=1) for d in part]
        return {name: d.reshape(shape) for (name, shape), d in zip(table, dense)}

    def read_sparse(self, r: Reader, table, vc) -> dict[str, "SparseSection"]:
        """Every tensor's section checked as :meth:`decode_all` checks it (the same
        CodecErrors), its kept values decoded but not scattered: ``{name:``
        :class:`SparseSection` ``}``, so a consumer can add them straight into a running sum
        (``strategies/stream.py``)."""
        total_k = _density_k(self.density, sum(math.prod(s) for _, s in table))
        got = 0
        out = {}
        for name, shape in table:
            n = math.prod(shape)
            k = r.uvarint(f"kept count of {name!r}", n)
            if self.per_tensor:
                want = _density_k(self.density, n)
                if k != want:
                    raise CodecError(f"tensor {name!r}: {k} kept values, topk:{self.density!r} "
                                     f"keeps {want} of {n}")
            else:
                got += k
                if got > total_k:
                    raise CodecError(f"tensor {name!r}: kept counts exceed k={total_k}")
            where = None  # the kept positions: a bool mask (bitmap) or sorted indices (gaps)
            if 0 < k < n:
                mode = r.u8(f"index mode of {name!r}")
                bitmap = (n + 7) // 8
                if mode == 0:
                    where = unpack_bitmask(r.array("u1", bitmap, f"bitmap of {name!r}"), n,
                                           f"tensor {name!r}")
                    kept = int(np.count_nonzero(where))
                    if kept != k:
                        raise CodecError(f"tensor {name!r}: bitmap has {kept} bits set, "
                                         f"header says {k}")
                elif mode == 1:
                    nb = r.uvarint(f"index length of {name!r}", r.remaining)
                    if uvarint_len(nb) + nb >= bitmap:  # the encoder would have sent the bitmap
                        raise CodecError(f"tensor {name!r}: {nb} bytes of gap varints are not "
                                         f"smaller than its {bitmap}-byte bitmap")
                    buf = r.array("u1", nb, f"indices of {name!r}")
                    where = leb128_decode(buf, k, n - 1, f"indices of {name!r}")
                    where += 1
                    np.cumsum(where, out=where)
                    where -= 1
                    if int(where[-1]) >= n:
                        raise CodecError(f"tensor {name!r}: index {int(where[-1])} out of range "
                                         f"for {n} elements")
                else:
                    raise CodecError(f"tensor {name!r}: unknown index mode {mode}")
            groups = 1 if (len(shape) >= 2 and k > 0) else 0
            out[name] = SparseSection(where, vc.decode_values(r, (k,), groups, name), n)
        if not self.per_tensor and got != total_k:
            raise CodecError(f"kept counts add up to {got}, topk:{self.density!r} keeps {total_k}")
        return out

    def read_flat(self, r: Reader, table, vc, narrow: bool = False) -> "FlatSparse | None":
        """:meth:`read_sparse` of the whole rest of ``r`` (the body: nothing may follow it)
        into flat arrays, for ``fp32`` or ``affine`` values: one compiled pass makes every
        check (``_sparse_jit``). None, with ``r`` unread, for any other value coder and for a
        body the pass refuses: :meth:`read_sparse` then reads it and raises the CodecError
        naming what was wrong. ``narrow``: int32 positions where every tensor has fewer than
        2**31 values (4 bytes a kept value instead of 8: ``decode_all``'s peak memory)."""
        if vc.codec_id not in ("fp32", "affine"):
            return None
        from ._sparse_jit import scan_topk
        from .quantize import _OVERFLOW_LIMIT

        ns = np.array([math.prod(shape) for _, shape in table], np.int64)
        twod = np.array([len(shape) >= 2 for _, shape in table], np.bool_)
        total_k = _density_k(self.density, int(ns.sum()))
        wants = np.array([_density_k(self.density, int(n)) for n in ns], np.int64)
        cap = int(wants.sum()) if self.per_tensor else total_k
        narrow = narrow and int(ns.max(initial=0)) < 1 << 31
        idx, vals = np.empty(cap, np.int32 if narrow else np.int64), np.empty(cap, "<u4")
        kept = np.zeros(ns.size, np.int64)
        buf = np.frombuffer(r.buf, np.uint8)
        if scan_topk(buf, r.pos, r.end, ns, twod, self.per_tensor, wants, total_k, idx,
                     vals.view(np.uint8), vals, kept, getattr(vc, "bits", 0),
                     _OVERFLOW_LIMIT):
            r.pos = r.end
            return FlatSparse([name for name, _ in table], ns, kept, idx, vals.view("<f4"))
        return None


class FlatSparse:
    """A checked ``topk`` body (``fp32`` or ``affine`` values) in flat arrays: tensor t
    (``names[t]``, ``ns[t]`` values) keeps ``kept[t]`` values; they are the next ``kept[t]``
    entries of ``vals`` (float32, finite) at the tensor-local sorted positions of ``idx``
    (int64; int32 from ``read_flat(narrow=True)``), tensor after tensor."""

    kind = "sparse-flat"

    def __init__(self, names, ns, kept, idx, vals) -> None:
        self.names, self.ns, self.kept, self.idx, self.vals = names, ns, kept, idx, vals

    def sections(self) -> "dict[str, SparseSection]":
        """The same values as ``{name: SparseSection}`` (:meth:`TopK.read_sparse`'s form)."""
        out, j = {}, 0
        for name, n, k in zip(self.names, self.ns.tolist(), self.kept.tolist()):
            out[name] = SparseSection(None if k in (0, n) else self.idx[j:j + k],
                                      self.vals[j:j + k], n)
            j += k
        return out


class SparseSection(Section):
    """A checked ``topk`` section: ``n`` values of which the ``k`` kept ones are ``vals`` (flat
    float32, finite as the value coder guarantees) at ``where`` — a bool mask of ``n`` (bitmap
    mode), sorted int64 indices (gap mode), or None when every value (``k == n``) or none is
    kept."""

    kind = "sparse"

    def __init__(self, where: np.ndarray | None, vals: np.ndarray, n: int) -> None:
        self.where, self.vals, self.n = where, vals, int(n)

    def values(self, shape):
        """The dense tensor, as ``TopK.decode_all`` returns it (the dropped entries zero)."""
        if self.vals.size == self.n:
            return self.vals.reshape(shape)
        dense = np.zeros(shape, np.float32)
        if self.vals.size:
            _scatter(dense.reshape(-1), self.where, self.vals)
        return dense
