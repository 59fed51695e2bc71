"""The one weighted mean (fedlora/strategies/mean.py, docs/architecture.md "Streaming
aggregation").

Proves: ``weighted_mean`` gives, bit for bit, the float64 formula every mean of the project
used before it was one function (Σ (w_i/W)·float64(x_i), float32 at the end; FLASC's Σ x_i / n
in float64); a reply taken back with ``sign=-1`` leaves exactly the sum without it; and both
aggregation paths — decode-all and streaming — form their mean through ``WeightedSum``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedlora.strategies import mean as mean_mod
from fedlora.strategies.mean import WeightedSum, weighted_mean
from fedlora.strategies.replies import ClientUpdate

from test_hostile import configure, honest, make, reply, toy

SHAPES = {"a": (5, 7), "b": (3,), "c": (2, 2, 9)}


def ups(n, seed=0):
    rng = np.random.default_rng(seed)
    return [ClientUpdate(i, OrderedDict((k, rng.standard_normal(s).astype(np.float32) * 10 ** i)
                                        for k, s in SHAPES.items()), int(rng.integers(1, 50)), {})
            for i in range(n)]


def by_hand(updates):
    """The formula base.weighted_mean, stream.py and FlexLoRA each wrote out before."""
    total = float(sum(u.weight for u in updates))
    out = OrderedDict()
    for k in updates[0].tensors:
        acc = np.zeros(updates[0].tensors[k].shape, dtype=np.float64)
        for u in updates:
            acc += (u.weight / total) * u.tensors[k].astype(np.float64)
        out[k] = acc.astype(np.float32)
    return out


@pytest.mark.parametrize("n", [1, 2, 5])
def test_weighted_mean_is_the_float64_formula_bit_for_bit(n):
    u = ups(n)
    got, want = weighted_mean(u), by_hand(u)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k].view(np.uint32), want[k].view(np.uint32))
    part = weighted_mean(u, ["c", "a"])
    assert list(part) == ["c", "a"] and np.array_equal(part["a"], want["a"])


def test_equal_mean_is_flascs_sum_over_n_in_float64():
    u = ups(4, seed=3)
    got = weighted_mean(u, equal=True)
    for k in SHAPES:
        want = sum(x.tensors[k].astype(np.float64) for x in u) / len(u)
        assert got[k].dtype == np.float64
        np.testing.assert_array_equal(got[k], want)


def test_taking_an_upload_back_leaves_the_sum_without_it():
    """The streamed path rejects a reply after adding it: add(−) must leave exactly what the
    other replies sum to, rescaled to their total (step 4)."""
    u = ups(3, seed=5)
    s = WeightedSum(SHAPES, sum(x.weight for x in u))
    for x in u:
        s.add(x.tensors, x.weight)
    s.add(u[1].tensors, u[1].weight, sign=-1.0)
    got = s.mean([u[0].weight, u[2].weight])
    want = weighted_mean([u[0], u[2]])
    for k in SHAPES:  # the rescale W/W' rounds differently from a fresh /W': equal to 1 ulp
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("streamed", [True, False])
def test_both_aggregation_paths_form_their_mean_through_weighted_sum(task_identity, streamed,
                                                                      monkeypatch):
    """fedavg with stream-aggregation on and off: the round's mean is WeightedSum's (each
    reply added once through it), not a second implementation."""
    calls = []
    real = WeightedSum.add

    def spy(self, tensors, weight, reference=None, sign=1.0):
        calls.append(weight)
        return real(self, tensors, weight, reference, sign)

    monkeypatch.setattr(mean_mod.WeightedSum, "add", spy)
    s = make("fedavg", stream_aggregation=streamed, codec_up="topk:0.3|affine:4")
    msgs = configure(s, 1, toy(0), (1, 2, 3))
    arrays, _ = s.aggregate_train(1, [reply(m, honest(s, m, 1, i), n=10 + i)
                                      for i, m in enumerate(msgs)])
    assert arrays is not None and sorted(calls) == [10, 11, 12]
