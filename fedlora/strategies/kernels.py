"""The server's element-wise passes over an update, compiled by numba: its L2 norm and, fused
with it, the weighted add into a float64 running sum (streaming aggregation).

One definition of the sum of squares serves both aggregation paths (decode-all through
:func:`fedlora.strategies.guard.update_norm`, streamed through :func:`add_and_sumsq`), so a
round's norms — and with them its norm bound and every clip decision — do not depend on the
path. The order of the float64 additions is fixed here (eight interleaved partial sums over the
flat tensor, combined pairwise, then tensor after tensor), not left to numpy's or BLAS's
blocking. The add is ``acc[i] += w * float64(x[i])``: the same IEEE operations, in the same
order per element, as :func:`fedlora.strategies.base.weighted_mean` (no fast-math, so LLVM
never contracts the multiply and add into an FMA), so both paths stay bit-identical.

The kernel releases the GIL; compiled code is cached on disk (``compression/_jit.py``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..compression._jit import cached_njit

__all__ = ["sumsq", "add_and_sumsq", "sections_add_and_sumsq", "sparse_add_and_sumsq",
           "flat_add_and_sumsq", "zeros_sum"]


@cached_njit
def _pass(x, ref, has_ref, acc, w, add):  # pragma: no cover - compiled
    """Σ (x − ref)² in float64 (``ref`` ignored unless ``has_ref``); with ``add`` also
    ``acc += w · x`` (float64 product). Eight partial sums, lanes j = i mod 8."""
    n = x.size
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    i = 0
    while i + 8 <= n:
        d0 = np.float64(x[i])
        d1 = np.float64(x[i + 1])
        d2 = np.float64(x[i + 2])
        d3 = np.float64(x[i + 3])
        d4 = np.float64(x[i + 4])
        d5 = np.float64(x[i + 5])
        d6 = np.float64(x[i + 6])
        d7 = np.float64(x[i + 7])
        if add:
            acc[i] += w * d0
            acc[i + 1] += w * d1
            acc[i + 2] += w * d2
            acc[i + 3] += w * d3
            acc[i + 4] += w * d4
            acc[i + 5] += w * d5
            acc[i + 6] += w * d6
            acc[i + 7] += w * d7
        if has_ref:
            d0 -= np.float64(ref[i])
            d1 -= np.float64(ref[i + 1])
            d2 -= np.float64(ref[i + 2])
            d3 -= np.float64(ref[i + 3])
            d4 -= np.float64(ref[i + 4])
            d5 -= np.float64(ref[i + 5])
            d6 -= np.float64(ref[i + 6])
            d7 -= np.float64(ref[i + 7])
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
        s4 += d4 * d4
        s5 += d5 * d5
        s6 += d6 * d6
        s7 += d7 * d7
        i += 8
    t = 0.0
    while i < n:
        d = np.float64(x[i])
        if add:
            acc[i] += w * d
        if has_ref:
            d -= np.float64(ref[i])
        t += d * d
        i += 1
    return (((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))) + t


_NO_REF = np.zeros(0, np.float32)
_NO_ACC = np.zeros(0, np.float64)


def _flat(a) -> np.ndarray:
    a = np.ravel(np.asarray(a))
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return a


def _ref(reference, k, v):
    if reference is None:
        return _NO_REF, False
    if k not in reference or np.shape(reference[k]) != np.shape(v):
        raise ValueError(f"{k}: the reference has no tensor of the update's shape "
                         f"{np.shape(v)}")
    return _flat(reference[k]), True


def sumsq(tensors, reference=None) -> float:
    """Σ over the tensors (in order) of Σ (x − reference)² in float64 (see the module doc)."""
    total = 0.0
    for k, v in tensors.items():
        r, has = _ref(reference, k, v)
        total += _pass(_flat(v), r, has, _NO_ACC, 0.0, False)
    return total


def add_and_sumsq(acc, tensors, w: float, reference=None) -> float:
    """``acc[k] += w · tensors[k]`` (float64 ``acc``, same shapes) and, in the same pass, what
    :func:`sumsq` returns for ``tensors`` and ``reference``."""
    work = []
    for k, v in tensors.items():  # every check before the first add: all or nothing
        if k not in acc or acc[k].shape != np.shape(v) or acc[k].dtype != np.float64:
            raise ValueError(f"{k}: no float64 running sum of the update's shape "
                             f"{np.shape(v)}")
        work.append((_flat(v), acc[k].reshape(-1), *_ref(reference, k, v)))
    if len(work) != len(acc):
        raise ValueError(f"the update has {len(work)} tensors, the running sum {len(acc)}")
    total = 0.0
    for x, out, r, has in work:
        total += _pass(x, r, has, out, float(w), True)
    return total


# ------------------------------------------------------------------------------------------
# a top-k reply straight into the running sum: only its kept values are touched


@cached_njit
def _index_pass(idx, vals, n, acc, w, lanes):  # pragma: no cover - compiled
    """:func:`_pass` (no reference, with the add) of the dense tensor of ``n`` values that is
    zero except ``vals`` at the sorted positions ``idx``, touching only those: a dropped entry
    adds ``w·0 = +0`` to ``acc`` and ``0`` to its lane, which changes neither (a float64 sum
    that starts at +0 and adds finite values is never −0), and the kept ones are added in the
    same order into the same lane (``i mod 8``, or the tail past the last full 8), so the
    same bits."""
    n8 = n - n % 8
    for j in range(idx.size):
        i = idx[j]
        if i < 0 or i >= n:  # outside the tensor (the reader refuses that): stop, say where
            return j
        d = np.float64(vals[j])
        acc[i] += w * d
        if i < n8:
            lanes[i % 8] += d * d
        else:
            lanes[8] += d * d
    return idx.size


@cached_njit
def _mask_pass(mask, vals, acc, w, lanes):  # pragma: no cover - compiled
    """:func:`_index_pass` with the kept positions given as a bool mask (bitmap mode)."""
    n = mask.size
    n8 = n - n % 8
    j = 0
    for i in range(n):
        if mask[i]:
            if j == vals.size:  # more bits set than values (the reader refuses that)
                return j + 1
            d = np.float64(vals[j])
            j += 1
            acc[i] += w * d
            if i < n8:
                lanes[i % 8] += d * d
            else:
                lanes[8] += d * d
    return j


def sparse_add_and_sumsq(acc, sections, w: float) -> float:
    """What :func:`add_and_sumsq` (no reference) gives for the dense tensors of ``sections``
    (``{name: SparseSection}``, the running sum's tensors in its order), without forming them:
    each tensor's kept values are added at their positions (``_index_pass``), a tensor kept
    whole by the dense pass. The same float64 operations in the same order, so the same bits;
    every check before the first add (all or nothing), except a bitmap whose set bits are not
    its values' count (which ``TopK.read_sparse`` refuses): that raises after adding, and the
    caller forms the sum again."""
    work = []
    if list(sections) != list(acc):
        raise ValueError(f"the update's tensors {list(sections)[:3]}... are not the running "
                         f"sum's {list(acc)[:3]}...")
    for k, sec in sections.items():
        out = acc[k].reshape(-1)
        v = np.ravel(sec.vals)
        if acc[k].dtype != np.float64 or sec.n != out.size or v.dtype != np.float32 or not (
                v.size == out.size or (sec.where is not None and (
                    sec.where.size == out.size if sec.where.dtype == np.bool_
                    else sec.where.size == v.size)) or v.size == 0):
            raise ValueError(f"{k}: the section does not fit a float64 running sum of "
                             f"{out.size} values")
        if v.size and v.size < out.size and sec.where.dtype != np.bool_ and not (
                0 <= int(sec.where[0]) and int(sec.where[-1]) < out.size):
            raise ValueError(f"{k}: kept positions outside the tensor's {out.size} values")
        work.append((sec.where, v, out))
    total = 0.0
    for where, v, out in work:
        if v.size == out.size:
            total += _pass(v, _NO_REF, False, out, float(w), True)
            continue
        lanes = np.zeros(9)
        if v.size:
            if where.dtype == np.bool_:
                if _mask_pass(where, v, out, float(w), lanes) != v.size:
                    raise ValueError("a bitmap's set bits are not its kept values")
            elif _index_pass(where, v, out.size, out, float(w), lanes) != v.size:
                raise ValueError("kept positions outside the tensor")
        total += _combine(lanes)
    return total


@cached_njit
def _flat_pass(idx, vals, kept, offs, ns, acc, w, sums):  # pragma: no cover - compiled
    """:func:`_index_pass` of every tensor of a ``FlatSparse`` at once (tensor t's values at
    ``acc[offs[t]:]``), its lanes combined as :func:`_combine` does into ``sums[t]``. False
    (after adding) where a position is outside its tensor or the counts overrun the arrays."""
    j = 0
    for t in range(kept.size):
        n = ns[t]
        k = kept[t]
        if k < 0 or j + k > idx.size or j + k > vals.size:
            return False
        s = np.zeros(9)
        if _index_pass(idx[j:j + k], vals[j:j + k], n, acc[offs[t]:offs[t] + n], w, s) != k:
            return False
        j += k
        sums[t] = (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))) + s[8]
    return True


def zeros_sum(shapes) -> "OrderedDict[str, np.ndarray]":
    """A float64 running sum of zeros for tensors of ``shapes``, in order: views of one flat
    buffer (what :func:`flat_add_and_sumsq` adds into without a call per tensor)."""
    sizes = [int(np.prod(v)) for v in shapes.values()]
    buf = np.zeros(sum(sizes), np.float64)
    out, o = OrderedDict(), 0
    for (k, shape), n in zip(shapes.items(), sizes):
        out[k] = buf[o:o + n].reshape(shape)
        o += n
    return out


def _layout(acc):
    """``(flat buffer, {name: offset})`` when every tensor of ``acc`` is a view of one
    contiguous float64 buffer (:func:`zeros_sum`), else None."""
    first = next(iter(acc.values()), None)
    buf = getattr(first, "base", None)
    if (buf is None or buf.dtype != np.float64 or buf.ndim != 1
            or not buf.flags.c_contiguous or not buf.flags.writeable):
        return None
    start = buf.__array_interface__["data"][0]
    offs = {}
    for k, v in acc.items():
        o, rem = divmod(v.__array_interface__["data"][0] - start, 8)
        if (v.base is not buf or rem or not v.flags.c_contiguous or v.dtype != np.float64
                or o < 0 or o + v.size > buf.size):
            return None
        offs[k] = o
    return buf, offs


def flat_add_and_sumsq(acc, flat, w: float) -> float:
    """:func:`sparse_add_and_sumsq` of a ``FlatSparse`` (``compression.sparsify``: a whole
    checked top-k reply in flat arrays) in one compiled call when ``acc`` is a
    :func:`zeros_sum`; the same float64 operations, and the tensors' sums of squares added in
    ``acc``'s order, so the same bits. Checks before the first add, except positions outside
    a tensor (which the reader refuses): that raises after adding, and the caller forms the
    sum again."""
    names = list(flat.names)
    if sorted(names) != sorted(acc):
        raise ValueError(f"the update's tensors {names[:3]}... are not the running sum's "
                         f"{list(acc)[:3]}...")
    layout = _layout(acc)
    if layout is None:
        secs = flat.sections()
        return sparse_add_and_sumsq(acc, {k: secs[k] for k in acc}, w)
    buf, where = layout
    ns = np.asarray(flat.ns, np.int64)
    if any(int(n) != acc[k].size for k, n in zip(names, ns.tolist())):
        raise ValueError("the update's tensor sizes are not the running sum's")
    idx = np.asarray(flat.idx)
    vals = np.asarray(flat.vals)
    kept = np.asarray(flat.kept, np.int64)
    if idx.dtype != np.int64 or vals.dtype != np.float32 or kept.size != len(names):
        raise ValueError("the update's flat arrays are not int64 positions and float32 values")
    offs = np.array([where[k] for k in names], np.int64)
    sums = np.zeros(len(names))
    if not _flat_pass(idx, vals, kept, offs, ns, buf, float(w), sums):
        raise ValueError("kept positions outside a tensor, or more kept values than sent")
    by_name = dict(zip(names, sums.tolist()))
    total = 0.0
    for k in acc:
        total += by_name[k]
    return total


# ------------------------------------------------------------------------------------------
# decoding straight into the running sum: every reply of a round at once, tile by tile


_TILE = 1 << 14  # elements per tile: the float64 sum tile (128 KB) stays in L2 across replies


@cached_njit
def _affine_values(p, bits, m, s, zu, i0, i1, out):  # pragma: no cover - compiled
    """``out[k - i0]`` = value ``k`` of an affine section (``AffineSection``: ``b``-bit field
    ``k`` of ``p``, row ``k // m``), ``fl(fl(u - zu[r]) * s[r])`` as ``_jit.dequantize_range``
    computes it, for ``k`` in ``[i0, i1)``."""
    mask = (1 << bits) - 1
    i = i0
    while i < i1:
        r = i // m
        e = min(i1, (r + 1) * m)
        sr = s[r]
        zr = zu[r]
        if bits == 8:
            for k in range(i, e):
                out[k - i0] = (np.float32(p[k]) - zr) * sr
        elif bits == 4:
            k = i
            if k & 1 and k < e:  # a row that starts on a high nibble
                out[k - i0] = (np.float32(p[k >> 1] >> 4) - zr) * sr
                k += 1
            o = out[k - i0:]
            b = p[k >> 1:]
            pairs = (e - k) >> 1
            for j in range(pairs):  # two values a byte, low nibble first
                byte = b[j]
                o[2 * j] = (np.float32(byte & 15) - zr) * sr
                o[2 * j + 1] = (np.float32(byte >> 4) - zr) * sr
            k += 2 * pairs
            if k < e:
                out[k - i0] = (np.float32(p[k >> 1] & 15) - zr) * sr
        else:
            for k in range(i, e):
                pos = k * bits
                j = pos >> 3
                sh = pos & 7
                v = np.int64(p[j])
                if sh + bits > 8:
                    v |= np.int64(p[j + 1]) << 8
                out[k - i0] = (np.float32((v >> sh) & mask) - zr) * sr
        i = e


@cached_njit
def _lanes(x, ref, has_ref, acc, w, lanes):  # pragma: no cover - compiled
    """:func:`_pass` over one tile that starts at a multiple of 8 of its tensor, its eight lane
    sums (and, in a tensor's last tile, the tail's) carried in ``lanes[0:9]`` across tiles, so
    the lanes see the same additions in the same order as one :func:`_pass` of the tensor."""
    n = x.size
    s0, s1, s2, s3 = lanes[0], lanes[1], lanes[2], lanes[3]
    s4, s5, s6, s7 = lanes[4], lanes[5], lanes[6], lanes[7]
    i = 0
    while i + 8 <= n:
        d0 = np.float64(x[i])
        d1 = np.float64(x[i + 1])
        d2 = np.float64(x[i + 2])
        d3 = np.float64(x[i + 3])
        d4 = np.float64(x[i + 4])
        d5 = np.float64(x[i + 5])
        d6 = np.float64(x[i + 6])
        d7 = np.float64(x[i + 7])
        acc[i] += w * d0
        acc[i + 1] += w * d1
        acc[i + 2] += w * d2
        acc[i + 3] += w * d3
        acc[i + 4] += w * d4
        acc[i + 5] += w * d5
        acc[i + 6] += w * d6
        acc[i + 7] += w * d7
        if has_ref:
            d0 -= np.float64(ref[i])
            d1 -= np.float64(ref[i + 1])
            d2 -= np.float64(ref[i + 2])
            d3 -= np.float64(ref[i + 3])
            d4 -= np.float64(ref[i + 4])
            d5 -= np.float64(ref[i + 5])
            d6 -= np.float64(ref[i + 6])
            d7 -= np.float64(ref[i + 7])
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
        s4 += d4 * d4
        s5 += d5 * d5
        s6 += d6 * d6
        s7 += d7 * d7
        i += 8
    t = lanes[8]
    while i < n:
        d = np.float64(x[i])
        acc[i] += w * d
        if has_ref:
            d -= np.float64(ref[i])
        t += d * d
        i += 1
    lanes[0], lanes[1], lanes[2], lanes[3] = s0, s1, s2, s3
    lanes[4], lanes[5], lanes[6], lanes[7] = s4, s5, s6, s7
    lanes[8] = t


@cached_njit
def _affine_tensor(payloads, offs, bits, m, S, ZU, ref, has_ref, acc, W, lanes,
                   tmp):  # pragma: no cover - compiled
    """One tensor of every reply into ``acc``: for each tile, for each reply ``q`` in order,
    its values (packed at ``payloads[q][offs[q]:]``) decoded into ``tmp`` and added with weight
    ``W[q]``, its lanes in ``lanes[q]``. Returns nothing; the caller combines the lanes."""
    n = acc.size
    nb = (n * bits + 7) // 8
    for t0 in range(0, n, tmp.size):
        t1 = min(n, t0 + tmp.size)
        x = tmp[: t1 - t0]
        for q in range(W.size):
            p = payloads[q][offs[q]:offs[q] + nb]
            _affine_values(p, bits, m, S[q], ZU[q], t0, t1, x)
            _lanes(x, ref[t0:t1] if has_ref else ref, has_ref, acc[t0:t1], W[q], lanes[q])


def _combine(lanes) -> float:
    """:func:`_pass`'s final sum of its lanes and its tail."""
    s = [float(v) for v in lanes]
    return (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))) + s[8]


def sections_add_and_sumsq(acc, replies, weights, payloads, reference=None) -> list[float]:
    """What :func:`add_and_sumsq` gives for each reply in turn (``acc[k] += w_q · x_q[k]`` in
    reply order; per reply the sum of squares of ``x_q − reference``, tensor after tensor, the
    same float64 operations in the same order, so the same bits), from the replies' checked
    value sections (``Pipeline.sections``) instead of their decoded tensors: an ``affine``
    tensor is decoded tile by tile into a small buffer and added while the sum's tile is in
    cache, every reply in turn, so neither a reply's dense copy nor a pass of the whole float64
    sum per reply is paid. ``payloads[q]``: reply ``q``'s payload as a uint8 array, the memory
    its sections view. Tensors are split across the codec threads (each tensor's lanes are
    formed by one thread, in order)."""
    from numba.typed import List

    from ..compression.runtime import run_parallel

    names = list(acc)
    for secs in replies:
        if list(secs) != names:
            raise ValueError(f"a reply's sections {list(secs)[:3]}... are not the running "
                             f"sum's tensors {names[:3]}...")
    nrep = len(replies)
    sums = np.zeros((nrep, len(names)))
    w = np.asarray(weights, np.float64)
    bufs = List()
    for p in payloads:
        bufs.append(p)

    def tensor(j: int) -> None:
        k = names[j]
        out = acc[k].reshape(-1)
        ref, has = _ref(reference, k, acc[k])
        secs = [r[k] for r in replies]
        kinds = {(s.kind, getattr(s, "bits", 0)) for s in secs}
        if len(kinds) == 1 and secs[0].kind == "affine" and out.size:
            lanes = np.zeros((nrep, 9))
            offs = np.array([s.p.ctypes.data - payloads[q].ctypes.data
                             for q, s in enumerate(secs)], np.int64)
            nb = secs[0].p.size
            for q, s in enumerate(secs):  # the kernel reads payloads[q][off:off+nb] unchecked
                if not (s.p.size == nb and 0 <= offs[q] <= payloads[q].size - nb):
                    raise ValueError(f"{k}: reply {q}'s packed values are not inside its payload")
            S = np.stack([s.s for s in secs])
            ZU = np.stack([s.zu for s in secs])
            m = out.size // secs[0].groups
            _affine_tensor(bufs, offs, secs[0].bits, m, S, ZU, ref, has, out, w, lanes,
                           np.empty(min(_TILE, out.size), np.float32))
            for q in range(nrep):
                sums[q, j] = _combine(lanes[q])
            return
        for q, s in enumerate(secs):  # dense (raw fp32 views) or mixed: one pass per reply
            x = s.x if s.kind == "dense" else s.values(acc[k].shape).reshape(-1)
            sums[q, j] = _pass(x, ref, has, out, float(w[q]), True)

    def part(a: int, b: int) -> None:
        for j in range(a, b):
            tensor(j)

    run_parallel(part, len(names), min_per_part=1)
    totals = []
    for q in range(nrep):
        total = 0.0
        for j in range(len(names)):
            total += float(sums[q, j])
        totals.append(total)
    return totals
