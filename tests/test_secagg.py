"""The secure-aggregation protocol core (fedlora/secagg), without Flower: what the server sees
of one node is uniform, the unmasked sum is exactly the sum of the quantized updates, dropouts
are recovered up to the threshold and refused past it, a node lost before sharing is left out,
malformed messages are refused with a reason, and no decoder raises anything but SecAggError."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.secagg import (ClientSession, Params, RecoveryError, SecAggError, ServerSession,
                            auto_degree, auto_threshold, coordinate_set, neighbours, ring)
from fedlora.secagg import messages as m
from fedlora.secagg.local import LocalRound


def params(n=10, degree=None, t=None, bits=8, dim=500, seed=3, noise=0.0, cap=0):
    degree = n - 1 if degree is None else degree
    t = auto_threshold(degree, 0.5) if t is None else t
    return Params(bytes(range(16)), n, degree, t, bits, ring.ring_bits(bits, n), 1.0, dim, seed,
                  noise, cap)


def updates(p, rng, extreme=False):
    lv = ring.levels(p.bits)
    if extreme:  # every node at +L: the largest sum the ring must hold without wrapping
        return {i: np.full(p.dim, lv, np.int64) for i in range(p.n)}
    return {i: rng.integers(-lv, lv + 1, p.dim) for i in range(p.n)}


def test_one_masked_upload_is_uniform():
    """Chi-square of one node's masked k-bit values against the uniform law, for an update that
    is constant (the most structured input): the statistic is within 5 standard deviations of
    its mean. Unmasked, the same values would all fall in one bin."""
    p = params(n=4, bits=4, dim=60_000)  # k = 4 + 2 + 1 = 7 bits: 128 bins, ~470 a bin
    q = {i: np.full(p.dim, 7, np.int64) for i in range(p.n)}
    srv, nodes = _through_shares(p)
    y = ring.unpack(nodes[0].masked_input(srv.routed()[0], q[0]), p.dim, p.ring_bits)
    bins = 1 << p.ring_bits
    counts = np.bincount(y.astype(np.int64), minlength=bins)
    assert counts.size == bins
    exp = p.dim / bins
    chi2 = float(((counts - exp) ** 2 / exp).sum())
    df = bins - 1
    assert abs(chi2 - df) < 5 * math.sqrt(2 * df), chi2
    # and the masks really are what hides it: the value without masks is one bin
    assert np.unique(ring.to_ring(q[0], p.ring_bits)).size == 1


@pytest.mark.parametrize("n,degree", [(10, None), (30, 8)])
def test_unmasked_sum_is_exact(n, degree):
    """The unmasked sum equals Σ q exactly (complete graph and a sparse k-regular one), also at
    the extreme where every node sends +L on every coordinate."""
    rng = np.random.default_rng(1)
    p = params(n=n, degree=degree)
    for extreme in (False, True):
        q = updates(p, rng, extreme)
        out = LocalRound(p).run(q)
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, sum(q.values()))


def test_dropouts_after_masking_recovered_up_to_n_minus_t_then_refused():
    """Complete graph, n = 10, t = 6: 4 nodes lost after sending masked input (self masks of the
    rest, pairwise masks of the lost ones via their reconstructed keys) give the survivors' exact
    sum; also nodes lost after masking (before unmasking) are fine; 5 lost is refused with a
    RecoveryError naming the threshold."""
    rng = np.random.default_rng(2)
    p = params(n=10, t=6)
    q = updates(p, rng)
    lost = {1: "masked", 4: "masked", 7: "masked", 9: "masked"}
    lr = LocalRound(p)
    out = lr.run(q, lost)
    np.testing.assert_array_equal(out, sum(q[i] for i in q if i not in lost))
    assert lr.server.dropped == [1, 4, 7, 9]
    # 3 lost before masking + 1 that masked but does not answer the unmask request: recovered
    out = LocalRound(p).run(q, {1: "masked", 4: "masked", 7: "masked", 9: "unmask"})
    np.testing.assert_array_equal(out, sum(q[i] for i in q if i not in (1, 4, 7)))
    with pytest.raises(RecoveryError, match="threshold t = 6"):
        LocalRound(p).run(q, {i: "masked" for i in (0, 1, 2, 3, 4)})


def test_sparse_graph_dropouts_checked_per_neighbourhood():
    """k-regular graph: losing all but t−1 of one node's holders is refused (names the node),
    a few scattered dropouts are recovered exactly."""
    rng = np.random.default_rng(3)
    p = params(n=30, degree=8, t=6)
    q = updates(p, rng)
    out = LocalRound(p).run(q, {0: "masked", 15: "masked"})
    np.testing.assert_array_equal(out, sum(q[i] for i in q if i not in (0, 15)))
    nb = p.neighbours(5)
    with pytest.raises(RecoveryError, match="surviving holders"):
        LocalRound(p).run(q, {j: "masked" for j in nb[:5]})


def test_node_lost_before_sharing_is_left_out():
    """A node that advertised keys but sent no shares is in nobody's masks: the sum is the
    others' exactly, with no recovery needed for it."""
    rng = np.random.default_rng(4)
    p = params(n=8, t=5)
    q = updates(p, rng)
    lr = LocalRound(p)
    out = lr.run(q, {3: "share", 6: "advertise"})
    np.testing.assert_array_equal(out, sum(q[i] for i in q if i not in (3, 6)))
    assert 3 not in lr.server.shares and lr.server.dropped == []
    # its neighbours were sent its keys but were not routed any share of it
    assert 3 not in m.decode_cts(lr.server.routed()[0], p.n)


def _through_shares(p):
    srv = ServerSession(p)
    nodes = {i: ClientSession(p, i) for i in range(p.n)}
    for i, c in nodes.items():
        srv.receive_advertise(i, c.advertise())
    for i, req in srv.key_requests().items():
        srv.receive_shares(i, nodes[i].share_keys(req))
    return srv, nodes


def test_malformed_messages_refused_with_a_reason():
    """Bad keys, shares addressed to the wrong nodes, tampered ciphertexts, repeated or out-of-
    order requests and unmask requests naming a node as both survivor and dropped are each a
    SecAggError with a reason; a node that refuses a tampered share is then a dropout the round
    recovers from."""
    p = params(n=6, t=4, dim=50)
    srv = ServerSession(p)
    with pytest.raises(SecAggError, match="96 bytes"):
        srv.receive_advertise(0, b"\1" * 95)
    with pytest.raises(SecAggError, match="equal"):
        srv.receive_advertise(0, b"\1" * 96)
    srv, nodes = _through_shares(p)
    with pytest.raises(SecAggError, match="not asked or repeated"):
        srv.receive_shares(0, b"")
    # a neighbour-keys message naming a node outside the graph (degree 4 of 6: index not a nb)
    p2 = params(n=6, degree=2, t=2, dim=5)
    c = ClientSession(p2, 0)
    c.advertise()
    other = next(j for j in range(6) if j not in p2.neighbours(0) and j != 0)
    with pytest.raises(SecAggError, match="non-neighbours"):
        c.share_keys(m.encode_keys({other: (b"\2" * 32, b"\3" * 32)}))
    # a low-order (all-zero) public key is refused when it is used
    c2 = ClientSession(p2, 0)
    c2.advertise()
    nb = p2.neighbours(0)
    with pytest.raises(SecAggError, match="bad public key"):
        c2.share_keys(m.encode_keys({j: (bytes(32), bytes(32)) for j in nb}))
    # a tampered ciphertext: the node refuses the whole routed message
    routed = srv.routed()
    cts = m.decode_cts(routed[2], p.n)
    k = next(iter(cts))
    bad = bytearray(cts[k])
    bad[-1] ^= 1
    cts[k] = bytes(bad)
    q = {i: np.zeros(p.dim, np.int64) + i for i in range(p.n)}
    with pytest.raises(SecAggError, match="does not authenticate"):
        nodes[2].masked_input(m.encode_cts(cts), q[2])
    for i, req in routed.items():
        if i != 2:
            srv.receive_masked(i, nodes[i].masked_input(req, q[i]))
    with pytest.raises(SecAggError, match="out of order"):
        nodes[0].masked_input(routed[0], q[0])
    reqs = srv.unmask_requests()
    with pytest.raises(SecAggError, match="both survived and dropped"):
        nodes[0].unmask(m.encode_unmask([0, 1], [1]))
    for i, req in reqs.items():
        srv.receive_unmask(i, nodes[i].unmask(req))
    np.testing.assert_array_equal(srv.result(), sum(q[i] for i in q if i != 2))
    with pytest.raises(SecAggError, match="not asked or repeated"):
        srv.receive_unmask(0, b"")


def test_a_wrong_revealed_share_is_survived_or_refused():
    """A revealed share that is a valid field element but wrong: with more than t shares the
    server finds a subset that matches the commitment; with exactly t it refuses."""
    p = params(n=7, t=4, dim=20)
    rng = np.random.default_rng(5)
    q = updates(p, rng)

    def run(corrupt_holders):
        srv, nodes = _through_shares(p)
        for i, req in srv.routed().items():
            srv.receive_masked(i, nodes[i].masked_input(req, q[i]))
        for i, req in srv.unmask_requests().items():
            rows = m.decode_reveal(nodes[i].unmask(req), p.n)
            if i in corrupt_holders:
                rows = [(a, k, (1).to_bytes(66, "big")) if a == 0 else (a, k, s)
                        for a, k, s in rows]
            srv.receive_unmask(i, m.encode_reveal(rows))
        return srv

    np.testing.assert_array_equal(run({1}).result(), sum(q.values()))
    srv = run(set(range(1, 7)))
    with pytest.raises(RecoveryError, match="do not reconstruct"):
        srv.result()


def test_decoders_fuzzed_never_raise_anything_else():
    """Random bytes, truncations and single-byte flips of valid messages through every decoder
    and every receive step: accepted or SecAggError, nothing else."""
    rng = np.random.default_rng(6)
    p = params(n=5, t=3, dim=33)
    srv, nodes = _through_shares(p)
    routed = srv.routed()
    y = nodes[1].masked_input(routed[1], np.zeros(p.dim, np.int64))
    samples = [p.to_bytes(), params(n=5, t=3, dim=33, cap=100).to_bytes(), routed[0], y,
               m.encode_unmask([0, 1], [2]),
               m.encode_reveal([(1, 0, bytes(66))]), m.encode_keys(nodes[0].peers), bytes(96)]

    def variants():
        for s in samples:
            for _ in range(30):
                yield bytes(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8))
                yield s[:int(rng.integers(0, len(s) + 1))]
                b = bytearray(s)
                if b:
                    b[int(rng.integers(0, len(b)))] ^= int(rng.integers(1, 256))
                yield bytes(b)

    decoders = [Params.from_bytes, lambda d: m.decode_keys(d, p.n),
                lambda d: m.decode_cts(d, p.n), lambda d: m.decode_unmask(d, p.n),
                lambda d: m.decode_reveal(d, p.n), m.decode_advertise,
                lambda d: ring.unpack(d, p.dim, p.ring_bits)]
    n_ok = n_err = 0
    for d in variants():
        for f in decoders:
            try:
                f(d)
                n_ok += 1
            except SecAggError:
                n_err += 1
        for step in (lambda d: ServerSession(p).receive_advertise(0, d),
                     lambda d: srv.receive_masked(3, d),
                     lambda d: ClientSession(p, 0, stage="advertised").share_keys(d),
                     lambda d: ClientSession.from_record(
                         {**nodes[4].to_record(), "stage": "shared"}).masked_input(
                             d, np.zeros(p.dim, np.int64)),
                     lambda d: ClientSession.from_record(
                         {**nodes[4].to_record(), "stage": "masked"}).unmask(d)):
            try:
                step(d)
            except SecAggError:
                pass
    assert n_ok and n_err


def test_state_survives_a_round_trip_between_messages():
    """A node's session stored as a record (its Context state) and read back mid-round gives
    the same sum."""
    rng = np.random.default_rng(7)
    p = params(n=5, t=3, dim=40)
    q = updates(p, rng)
    srv = ServerSession(p)
    recs = {}
    for i in range(p.n):
        c = ClientSession(p, i)
        srv.receive_advertise(i, c.advertise())
        recs[i] = c.to_record()
    for i, req in srv.key_requests().items():
        c = ClientSession.from_record(recs[i])
        srv.receive_shares(i, c.share_keys(req))
        recs[i] = c.to_record()
    for i, req in srv.routed().items():
        c = ClientSession.from_record(recs[i])
        srv.receive_masked(i, c.masked_input(req, q[i]))
        recs[i] = c.to_record()
    for i, req in srv.unmask_requests().items():
        srv.receive_unmask(i, ClientSession.from_record(recs[i]).unmask(req))
    np.testing.assert_array_equal(srv.result(), sum(q.values()))


def test_quantization_packing_and_graph():
    """Stochastic rounding is unbiased and within [−L, L]; k-bit packing round-trips and refuses
    set padding bits; the neighbour graph is k-regular and symmetric; the coordinate set is one
    per seed; the ring holds n·L."""
    rng = np.random.default_rng(8)
    x = np.full(200_000, 0.3)
    qv = ring.quantize(x, 4, 1.0, rng)
    assert np.abs(qv).max() <= 7
    assert abs(qv.mean() / ring.scale(4, 1.0) - 0.3) < 0.005
    for k in (3, 13, 40, 62):
        r = rng.integers(0, 1 << k, 77, dtype=np.uint64)
        np.testing.assert_array_equal(ring.unpack(ring.pack(r, k), 77, k), r)
    with pytest.raises(SecAggError, match="padding"):
        ring.unpack(b"\xff" * ring.packed_len(3, 5), 3, 5)
    for n, d in ((50, 10), (1000, auto_degree(1000))):
        nb = {i: neighbours(n, d, 9, i) for i in range(n)}
        assert all(len(v) == d and i not in v for i, v in nb.items())
        assert all(i in nb[j] for i, v in nb.items() for j in v)
    assert auto_degree(10) == 9 and auto_degree(1000) == 22
    np.testing.assert_array_equal(coordinate_set(1000, 0.1, 5), coordinate_set(1000, 0.1, 5))
    assert coordinate_set(1000, 0.1, 5).size == 100
    for n in (2, 10, 1000):
        assert ring.levels(16) * n < 1 << (ring.ring_bits(16, n) - 1)


def test_distributed_noise_has_the_summed_variance():
    """Each node's Skellam share of variance μ/n: the unmasked sum of all-zero updates is
    integer noise with mean ≈ 0 and variance ≈ μ (within 5 %, 20,000 coordinates); with no
    noise the same sum is exactly 0."""
    n, mu = 5, 400.0
    p = params(n=n, t=3, dim=20_000, noise=mu / n)
    zeros = {i: np.zeros(p.dim, np.int64) for i in range(n)}
    out = LocalRound(p).run(zeros, rng=np.random.default_rng(9))
    assert abs(out.mean()) < 0.5 and abs(out.var() / mu - 1) < 0.05, (out.mean(), out.var())
    assert not LocalRound(params(n=n, t=3, dim=100)).run(
        {i: np.zeros(100, np.int64) for i in range(n)}).any()


def test_benchmark_script_writes_its_tables(tmp_path):
    """``benchmarks/secagg.py`` at toy size: both result files, the masked input exactly
    ⌈dim·k/8⌉ bytes per node, the sums checked inside."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import secagg as bench

    assert bench.main(["--nodes", "10", "--dim", "256", "--apps-nodes", "0",
                       "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "secagg.json").read_text())
    rows = res["protocol"]
    assert [r["lost_after_sharing"] for r in rows] == [0, 1]
    assert all(r["masked_up_bytes"] == (256 * r["ring_bits"] + 7) // 8 for r in rows)
    assert "| 10 | 9 | 6 |" in (tmp_path / "secagg.txt").read_text()


def _clipped(rng, n, dim, clip=1.0):
    xs = []
    for _ in range(n):
        x = rng.normal(0.0, 1.0, dim) * rng.uniform(0.05, 1.0)
        xs.append(x * min(1.0, clip / np.linalg.norm(x)))
    return xs


def test_weighted_secure_mean_is_the_plain_weighted_mean():
    """Weighted round (W = 100, 12 bits): the unmasked sum is exactly Σ of the nodes' integer
    vectors (scaled values and the weight coordinate: Σ w_i exact, a reported 250 capped to W
    by the node itself), also with a node lost after sharing; de-scaled it is the plain
    weighted mean Σ w_i x_i / Σ w_i of the clipped updates within the rounding bound
    n·W/(s·Σw), while the unweighted mean is far outside that bound (so the test would catch a
    lost weight)."""
    from fedlora.secagg.mean import node_vector, survivors_mean

    rng = np.random.default_rng(11)
    n, dim, cap = 7, 300, 100
    p = params(n=n, bits=12, dim=dim + 1, cap=cap)
    xs = _clipped(rng, n, dim)
    reported = [1, 3, 40, 250, 100, 7, 60]
    w = [min(r, cap) for r in reported]
    xs[3] = xs[3] * 0 + 1.0 / np.sqrt(dim)  # the heavy node pulls the weighted mean away
    q = {i: node_vector(xs[i], reported[i], p, rng) for i in range(n)}
    assert [int(v[-1]) for v in q.values()] == w
    for lost in ({}, {5: "masked"}):
        alive = [i for i in range(n) if i not in lost]
        total = LocalRound(p).run(q, stop_before=lost)
        np.testing.assert_array_equal(total, sum(q[i] for i in alive))
        mean, wsum = survivors_mean(total, p, len(alive))
        assert wsum == sum(w[i] for i in alive)
        plain = sum(w[i] * xs[i] for i in alive) / wsum
        bound = len(alive) * cap / (p.scale * wsum)
        assert np.abs(mean - plain).max() <= bound
        unweighted = sum(xs[i] for i in alive) / len(alive)
        assert np.abs(unweighted - plain).max() > 10 * bound


def test_weighted_round_at_the_cap_cannot_overflow():
    """At the bound: W = L (the largest cap Params accepts) and every node at +L (then −L) on
    every value coordinate with weight W: the sum n·L comes back exact in the usual
    k = bits + ⌈log2 n⌉ + 1 ring, no extra bit. node_vector reaches ±L exactly for x = ±C·e_j
    and weight ≥ W. Past the bound: W = L + 1 is refused, and so is a weight coordinate outside
    [0, W] at the node and a weight sum outside (0, survivors·W] at the server."""
    from fedlora.secagg.mean import node_vector, survivors_mean

    bits, n = 8, 10
    lv = ring.levels(bits)
    p = params(n=n, bits=bits, dim=33, cap=lv)
    assert p.ring_bits == bits + 4 + 1
    for sign in (1, -1):
        q = {i: np.concatenate([np.full(32, sign * lv, np.int64), [lv]]) for i in range(n)}
        total = LocalRound(p).run(q)
        assert total[:-1].tolist() == [sign * n * lv] * 32 and total[-1] == n * lv
        mean, wsum = survivors_mean(total, p, n)
        np.testing.assert_allclose(mean, sign * 1.0)  # C = 1: everyone at +C, weight W
    e = np.zeros(32)
    e[5] = -1.0
    v = node_vector(e, 10**9, p, np.random.default_rng(0))
    assert v[5] == -lv and v[-1] == lv and not np.delete(v, [5, 32]).any()
    with pytest.raises(SecAggError, match="weight cap"):
        params(n=n, bits=bits, dim=33, cap=lv + 1)
    with pytest.raises(SecAggError, match="no distributed noise"):
        params(n=n, bits=bits, dim=33, cap=lv, noise=1.0)
    srv, nodes = _through_shares(params(n=5, t=3, bits=bits, dim=4, cap=50))
    for bad in (51, -1):
        with pytest.raises(SecAggError, match="weight coordinate"):
            nodes[0].masked_input(srv.routed()[0], np.array([0, 0, 0, bad]))
    for wsum in (0, -3, 5 * 50 + 1):
        with pytest.raises(SecAggError, match="weight sum"):
            survivors_mean(np.array([0, 0, 0, wsum]), srv.params, 5)


def test_weighted_params_round_trip_and_fuzz():
    """The weight cap travels in the round's parameters (to_bytes/from_bytes); a parameter blob
    whose cap field is flipped past L or whose length is off is refused with SecAggError, never
    another exception."""
    p = params(n=5, t=3, bits=8, dim=9, cap=100)
    assert Params.from_bytes(p.to_bytes()) == p
    blob = bytearray(p.to_bytes())
    blob[-4:] = (200).to_bytes(4, "big")
    with pytest.raises(SecAggError, match="weight cap"):
        Params.from_bytes(bytes(blob))
    rng = np.random.default_rng(12)
    for _ in range(300):
        b = bytearray(p.to_bytes())
        b[int(rng.integers(0, len(b)))] ^= int(rng.integers(1, 256))
        for d in (bytes(b), bytes(b[:-1]), bytes(b) + b"\0"):
            try:
                Params.from_bytes(d)
            except SecAggError:
                pass


def test_announced_coordinate_fields_checked_and_fuzzed():
    """The node's half of a weighted round (the train instruction's secure-aggregation part,
    parsed by ``SecAggInstruction.from_config``, then ``client_masked_input``): the fields the
    train config announces — ``secagg-total``, ``secagg-density``, ``secagg-coords-seed`` — are
    checked: each wrong type or range is a ValueError (SecAggError is one) naming the field, and
    random values of random types give only ValueError or a valid masked input; an honest
    announcement (density 0.5: half the coordinates + the weight) gives a masked input that the
    server unmasks to the node's capped weight."""
    from fedlora.strategies.protocol import SecAggInstruction
    from fedlora.strategies.secure import announced_coordinates, client_masked_input

    total = 40
    dim = coordinate_set(total, 0.5, 7).size + 1
    p = params(n=3, bits=10, dim=dim, cap=10)
    srv, nodes = _through_shares(p)
    routed = srv.routed()
    upload = {"b": np.full((4, 5), 0.01), "a": np.full((20,), -0.02)}
    good = {"secagg-total": total, "secagg-density": 0.5, "secagg-coords-seed": 7}

    def fresh(i):
        return ClientSession.from_record({**nodes[i].to_record(), "stage": "shared"})

    def mask(sess, i, conf, weight=1):
        ins = SecAggInstruction.from_config({**conf, "secagg-routed": routed[i],
                                             "secagg-index": i})
        announced_coordinates(ins)
        return client_masked_input(sess, ins, upload, weight)

    for i in range(3):
        srv.receive_masked(i, mask(nodes[i], i, good, 25))
    for i, req in srv.unmask_requests().items():
        srv.receive_unmask(i, nodes[i].unmask(req))
    assert srv.result()[-1] == 3 * 10  # each node capped its 25 examples at W = 10
    bad = [("secagg-density", v) for v in (0, -0.1, 1.5, float("nan"), "0.5", True, None)] + \
          [("secagg-coords-seed", v) for v in (-1, 2 ** 63, 1.5, "7", True, None)] + \
          [("secagg-total", v) for v in (None, "40", True, 41, 39)]
    for key, v in bad:
        with pytest.raises(ValueError, match=key if v not in (41, 39) else "coordinates"):
            mask(fresh(0), 0, {**good, key: v})
    rng = np.random.default_rng(13)
    pool = [0, 1, -1, 7, 40, 2 ** 64, 0.5, 1.0, 1e-9, float("inf"), "x", b"\x00", None, [1]]
    for _ in range(200):
        conf = {k: pool[int(rng.integers(0, len(pool)))] if rng.random() < 0.5 else v
                for k, v in good.items()}
        try:
            mask(fresh(1), 1, conf)
        except ValueError:
            pass


def test_rank_union_messages_strict_and_fuzzed():
    """Rank union (lora-a2, secagg-rank-union), the node's half: its train reply masks one 0/1
    indicator per rank slice (the carried ones: here slices 2 and 4 of 8) and keeps its clipped
    update; the values request (announced bitmap + routed shares) gives a masked input on the
    announced slices' coordinates plus the non-LoRA tensor and the weight. A bitmap of the wrong
    length, with padding bits set, announcing a set the session's size does not match, a
    truncated or random request, or no kept update: SecAggError, never another exception."""
    from types import SimpleNamespace

    from flwr.app import RecordDict

    from fedlora.strategies.protocol import SecAggInstruction
    from fedlora.strategies.secure import (client_indicator_input, client_values,
                                           slice_indicators, slice_table, union_coordinates)

    up = {"m.lora_B.weight": np.zeros((5, 4)), "n.lora_B.weight": np.zeros((3, 4)),
          "head.bias": np.full(3, 0.1)}
    up["m.lora_B.weight"][:, 2] = 0.2
    up["n.lora_B.weight"][:, 0] = -0.1
    shapes = {k: v.shape for k, v in up.items()}
    assert slice_table(shapes)[2] == ("m.lora_B.weight", 2) and len(slice_table(shapes)) == 8
    assert slice_indicators(up).tolist() == [0, 0, 1, 0, 1, 0, 0, 0]
    ctx = SimpleNamespace(state=RecordDict())
    srv_a, nodes_a = _through_shares(params(n=3, bits=10, dim=8))
    ins = SecAggInstruction(srv_a.routed()[0], 0, 35, 1.0, 0, union=True)
    y = client_indicator_input(nodes_a[0], ins, up, 7, ctx)
    assert len(y) == ring.packed_len(8, srv_a.params.ring_bits)
    chosen = np.zeros(8, bool)
    chosen[[2, 4]] = True
    coords = union_coordinates(shapes, chosen)
    assert coords.size == 3 + 5 + 3
    p_b = params(n=3, bits=10, dim=coords.size + 1, cap=10)
    srv_b, nodes_b = _through_shares(p_b)
    routed = srv_b.routed()[0]

    def fresh():
        return ClientSession.from_record({**nodes_b[0].to_record(), "stage": "shared"})

    good = m.encode_values(m.encode_bitmap(chosen), routed)
    assert len(client_values(fresh(), good, ctx)) == ring.packed_len(p_b.dim, p_b.ring_bits)
    other = chosen.copy()
    other[5] = True
    bad = [m.encode_values(m.encode_bitmap(other), routed),        # another union: wrong size
           m.encode_values(b"\x14\x01", routed),                     # 2 bytes for 8 bits
           m.encode_values(m.encode_bitmap(chosen), routed[:-1]),  # truncated shares
           good[:3], b""]
    for d in bad:
        with pytest.raises(SecAggError):
            client_values(fresh(), d, ctx)
    with pytest.raises(SecAggError, match="padding"):
        m.decode_bitmap(b"\x00\x02", 9)
    with pytest.raises(SecAggError, match="kept update"):
        client_values(fresh(), good, SimpleNamespace(state=RecordDict()))
    rng = np.random.default_rng(14)
    for _ in range(200):
        b = bytearray(good)
        b[int(rng.integers(0, len(b)))] ^= int(rng.integers(1, 256))
        for d in (bytes(b), bytes(b[:int(rng.integers(0, len(b)))]),
                  bytes(rng.integers(0, 256, int(rng.integers(0, 60)), dtype=np.uint8))):
            try:
                client_values(fresh(), d, ctx)
            except SecAggError:
                pass
