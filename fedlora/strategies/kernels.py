"""The server's element-wise passes over an update, compiled by numba: its L2 norm and, fused
with it, the weighted add into a float64 running sum (streaming aggregation).

One definition of the sum of squares serves both aggregation paths (decode-all through
:func:`fedlora.strategies.guard.update_norm`, streamed through :func:`add_and_sumsq`), so a
round's norms — and with them its norm bound and every clip decision — do not depend on the
path. The order of the float64 additions is fixed here (eight interleaved partial sums over the
flat tensor, combined pairwise, then tensor after tensor), not left to numpy's or BLAS's
blocking. The add is ``acc[i] += w * float64(x[i])`` (no fast-math, so LLVM never contracts
the multiply and add into an FMA): every add of :class:`fedlora.strategies.mean.WeightedSum`,
the one weighted mean of both aggregation paths, goes through it.

The kernel releases the GIL; compiled code is cached on disk (``compression/_jit.py``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..compression._jit import cached_njit, dequantize_fields

__all__ = ["sumsq", "add_and_sumsq", "sections_add_and_sumsq", "sparse_add_and_sumsq",
           "flat_add_and_sumsq", "zeros_sum"]


_TILE = 1 << 14  # elements per block of _pass / tile of the sectioned sum (a multiple of 8):
#                  its float64 squares or sum (128 KB) stay in L2


@cached_njit
def _lanes(x, ref, has_ref, acc, w, add, lanes, sq):  # pragma: no cover - compiled
    """One block of :func:`_pass` that starts at a multiple of 8 of its tensor: with ``add``,
    ``acc[i] += w · float64(x[i])``; lane ``j`` (``lanes[j]``, carried across blocks) adds
    ``d² = (x[i] − ref[i])²`` for ``i ≡ j (mod 8)`` in order of ``i``, and ``lanes[8]`` the
    squares past the last full 8 (only a tensor's last block has any). The lanes are formed
    as a running sum down the rows of ``sq`` (``sq[8 + i] = d_i²``, then
    ``sq[i] += sq[i − 8]``): each lane sees the same additions in the same order as eight
    scalar partial sums would, but every loop here is one LLVM vectorizes (eight scalar
    accumulators are not: 0.7 ns an element against 0.35). ``sq``: scratch of at least
    ``x.size + 8`` float64."""
    n = x.size
    n8 = n - n % 8
    if add:
        for i in range(n):
            acc[i] += w * np.float64(x[i])
    for j in range(8):
        sq[j] = lanes[j]
    if has_ref:
        for i in range(n8):
            d = np.float64(x[i]) - np.float64(ref[i])
            sq[i + 8] = d * d
    else:
        for i in range(n8):
            d = np.float64(x[i])
            sq[i + 8] = d * d
    for i in range(8, n8 + 8):
        sq[i] += sq[i - 8]
    for j in range(8):
        lanes[j] = sq[n8 + j]
    t = lanes[8]
    for i in range(n8, n):
        d = np.float64(x[i])
        if has_ref:
            d -= np.float64(ref[i])
        t += d * d
    lanes[8] = t


@cached_njit
def _combine(lanes):  # pragma: no cover - compiled
    """The lanes' sum: the eight pairwise, then the tail (``lanes[8]``)."""
    return (((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))) + lanes[8]


@cached_njit
def _pass(x, ref, has_ref, acc, w, add):  # pragma: no cover - compiled
    """Σ (x − ref)² in float64 (``ref`` ignored unless ``has_ref``); with ``add`` also
    ``acc += w · x`` (float64 product). Eight partial sums, lanes j = i mod 8 in order of i
    (the squares past the last full 8 in a ninth), combined pairwise: ``_lanes`` block by
    block."""
    n = x.size
    lanes = np.zeros(9)
    sq = np.empty(min(n, _TILE) + 8)
    for b0 in range(0, n, _TILE):
        b1 = min(n, b0 + _TILE)
        _lanes(x[b0:b1], ref[b0:b1] if has_ref else ref, has_ref,
               acc[b0:b1] if add else acc, w, add, lanes, sq)
    return _combine(lanes)


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




@cached_njit
def _affine_values(p, bits, m, s, zu, i0, i1, out):  # pragma: no cover - compiled
    """``out[k - i0]`` = value ``k`` of an affine section (``AffineSection``: ``b``-bit field
    ``k`` of ``p``, row ``k // m``), ``fl(fl(u - zu[r]) * s[r])`` as ``_jit.dequantize_range``
    computes it, for ``k`` in ``[i0, i1)``."""
    i = i0
    while i < i1:
        r = i // m
        e = min(i1, (r + 1) * m)
        dequantize_fields(p, bits, i, e, s[r], zu[r], out[i - i0:])
        i = e


@cached_njit
def _tensors_into_sum(ts, bufs, offs, groups, gofs, bits, S, ZU, refs, has_ref, accs, W, sums,
                      tmp, sq):  # pragma: no cover - compiled
    """Tensors ``ts`` of every reply into the sum: for each tile of tensor ``t``, for each reply
    ``q`` in order, its values decoded into ``tmp`` — raw float32 at ``bufs[q][offs[q, t]:]``
    (``groups[q, t] == 0``) or ``affine:bits[q]`` packed there with the scales and zero
    offsets ``S[q] / ZU[q]`` from ``gofs[q, t]`` — and added with weight ``W[q]`` to
    ``accs[t]`` (``_lanes``: the tensor's lanes of reply ``q`` carried across the tiles);
    ``sums[q, t]``: that reply's sum of squares of the tensor, as :func:`_pass` gives it.
    Nothing is bounds-checked here: the caller has checked every offset."""
    tmp8 = tmp.view(np.uint8)
    lanes = np.zeros((W.size, 9))
    for t in ts:
        acc = accs[t]
        ref = refs[t]
        n = acc.size
        lanes[:, :] = 0.0
        for t0 in range(0, n, tmp.size):
            t1 = min(n, t0 + tmp.size)
            x = tmp[:t1 - t0]
            for q in range(W.size):
                o = offs[q, t]
                g = groups[q, t]
                if g == 0:
                    tmp8[:4 * (t1 - t0)] = bufs[q][o + 4 * t0:o + 4 * t1]
                else:
                    b = bits[q]
                    go = gofs[q, t]
                    _affine_values(bufs[q][o:o + (n * b + 7) // 8], b, n // g,
                                   S[q, go:go + g], ZU[q, go:go + g], t0, t1, x)
                _lanes(x, ref[t0:t1] if has_ref else ref, has_ref, acc[t0:t1], W[q], True,
                       lanes[q], sq)
        for q in range(W.size):
            sums[q, t] = _combine(lanes[q])


def _balanced(sizes, parts: int) -> list[list[int]]:
    """Indices of ``sizes`` in ``parts`` bins of near-equal total, largest first into the
    lightest bin (a tensor stays whole: its lanes are formed in order by one thread)."""
    bins: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for j in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        b = load.index(min(load))
        bins[b].append(j)
        load[b] += sizes[j]
    return [b for b in bins if b]


def sections_add_and_sumsq(acc, flats, weights, reference=None) -> list[float]:
    """What :func:`add_and_sumsq` gives for each reply in turn (``acc[k] += w_q · x_q[k]`` in
    reply order; per reply the sum of squares of ``x_q − reference``, tensor after tensor, the
    same float64 operations in the same order, so the same bits), from the replies' checked
    sections in flat form (``Pipeline.sections(..., flat=True)``: :class:`FlatDense`) instead
    of their decoded tensors: each tensor is decoded tile by tile into a small buffer and added
    while the sum's tile is in cache, every reply in turn, so neither a reply's dense copy nor
    a pass of the whole float64 sum per reply is paid. Tensors are split across the codec
    threads in bins of near-equal size (each tensor's lanes formed by one thread, in order);
    every offset is checked against its payload before the first add."""
    from numba.typed import List

    from ..compression.runtime import _workers, run_parallel

    names = list(acc)
    nrep, nt = len(flats), len(names)
    if not nt:
        return [0.0] * nrep
    sizes = [acc[k].size for k in names]
    offs = np.zeros((nrep, nt), np.int64)
    groups = np.zeros((nrep, nt), np.int64)
    gofs = np.zeros((nrep, nt), np.int64)
    bits = np.zeros(nrep, np.int64)
    for q, f in enumerate(flats):
        where = {k: t for t, k in enumerate(f.names)}
        if sorted(where) != sorted(names) or len(where) != len(f.names):
            raise ValueError(f"a reply's sections {list(f.names)[:3]}... are not the running "
                             f"sum's tensors {names[:3]}...")
        perm = np.array([where[k] for k in names], np.int64)
        ns, g = f.ns[perm], (f.groups[perm] if f.bits else np.zeros(nt, np.int64))
        nb = np.where(g == 0, 4 * ns, (ns * f.bits + 7) // 8)
        o, go = f.offs[perm], f.gofs[perm]
        if (np.any(ns != np.array(sizes, np.int64)) or np.any(o < 0) or np.any(o + nb > f.buf.size)
                or np.any((g > 0) & ((go < 0) | (go + g > f.S.size) | (ns % np.maximum(g, 1) != 0)))
                or f.S.size != f.ZU.size):
            raise ValueError(f"reply {q}'s sections do not fit its payload or the running sum")
        offs[q], groups[q], gofs[q], bits[q] = o, g, go, f.bits
    if any(acc[k].dtype != np.float64 or not acc[k].flags.c_contiguous for k in names):
        raise ValueError("the running sum is not contiguous float64")
    width = max((f.S.size for f in flats), default=0)
    S = np.zeros((nrep, width), np.float32)
    ZU = np.zeros((nrep, width), np.float32)
    for q, f in enumerate(flats):
        S[q, :f.S.size] = f.S
        ZU[q, :f.ZU.size] = f.ZU
    bufs, accs, refs = List(), List(), List()
    for f in flats:
        bufs.append(f.buf)
    rs = [_ref(reference, k, acc[k]) for k in names]
    has = rs[0][1]
    wide = len({r.dtype for r, _ in rs}) > 1  # float32 and float64: all float64 (exact)
    for k, (r, _) in zip(names, rs):
        accs.append(acc[k].reshape(-1))
        refs.append(r.astype(np.float64) if wide else r)
    sums = np.zeros((nrep, nt))
    w = np.asarray(weights, np.float64)
    bins = _balanced(sizes, 2 * _workers())

    def part(a: int, b: int) -> None:
        for i in range(a, b):
            _tensors_into_sum(np.array(bins[i], np.int64), bufs, offs, groups, gofs, bits, S,
                              ZU, refs, has, accs, w, sums, np.empty(_TILE, np.float32),
                              np.empty(_TILE + 8))

    run_parallel(part, len(bins), min_per_part=1)
    totals = []
    for q in range(nrep):
        total = 0.0
        for j in range(nt):
            total += float(sums[q, j])
        totals.append(total)
    return totals
