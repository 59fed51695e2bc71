"""A node caps its own resources by node config (issue 38, item 3): threads, the memory of its
training tensors, local steps; the caps are checked, applied, and not sent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora import node
from fedlora.node import NodeLimits, cap_by_memory, limits, set_threads
from fedlora.tasks.loop import make_optimizer, train_epochs


@pytest.mark.parametrize("key,value", [("threads", -1), ("threads", "two"), ("threads", 1.5),
                                       ("max-local-steps", True), ("max-data-mb", -0.5),
                                       ("max-data-mb", "x"), ("interop-threads", -2)])
def test_bad_node_config_names_the_key(key, value):
    """A bad cap is one clear error naming the key (not a silent no-cap)."""
    with pytest.raises(ValueError, match=key):
        NodeLimits.from_node_config({key: value})


def test_parsed_caps():
    lim = NodeLimits.from_node_config({"threads": 2, "interop-threads": "1",
                                       "max-local-steps": 5, "max-data-mb": 1.5,
                                       "partition-id": 0})
    assert lim == NodeLimits(2, 1, 5, 1.5)
    assert NodeLimits.from_node_config({}) == NodeLimits()


def _steps(n: int, epochs: int, batch: int) -> float:
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
    opt = make_optimizer(list(model.parameters()), "sgd", 0.1)
    out = train_epochs(model, n, epochs, batch, 0,
                       lambda idx, gen: torch.nn.functional.cross_entropy(model(x[idx]), y[idx]),
                       opt)
    return out["train-steps"]


def test_max_local_steps_stops_training_across_epochs():
    """20 examples, batch 4, 3 epochs = 15 steps; the node's cap of 7 stops at 7, only inside
    the node's call."""
    assert _steps(20, 3, 4) == 15
    with limits(NodeLimits(max_local_steps=7)):
        assert _steps(20, 3, 4) == 7
    assert _steps(20, 3, 4) == 15


def test_max_data_mb_keeps_a_fixed_subset_that_fits():
    idx = np.arange(1000)
    assert cap_by_memory(idx, 1024, 0, 1) is idx  # no cap outside a node call
    with limits(NodeLimits(max_data_mb=0.1)):  # 0.1 MiB / 1 KiB = 102 examples
        a = cap_by_memory(idx, 1024, 3, 1)
        b = cap_by_memory(idx, 1024, 3, 1)
        c = cap_by_memory(idx, 1024, 4, 1)
        assert len(a) == 102 and np.array_equal(a, b) and not np.array_equal(a, c)
        assert np.all(np.diff(a) > 0) and set(a) <= set(idx)
        assert cap_by_memory(idx[:50], 1024, 3, 1).size == 50  # fits already


def test_threads_capped_by_node():
    before = torch.get_num_threads()
    try:
        assert set_threads(4, NodeLimits(threads=1)) == 1 and torch.get_num_threads() == 1
        assert set_threads(1, NodeLimits(threads=8)) == 1  # the run's client-threads still caps
        assert set_threads(2, NodeLimits()) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert node.current() == NodeLimits()


@pytest.mark.slow
def test_capped_node_in_a_real_round(sample_dir, tmp_path):
    """Two nodes, each a real ClientApp in its own process; node 101 caps itself (1 thread,
    3 steps, 0.12 MiB of images = 40 Fashion-MNIST examples), node 102 does not. The capped
    node trained under its caps, and its reply carries the same records and metric names as
    the uncapped one: nothing of the caps travels."""
    from benchmarks.nodeproc import run_with_nodes

    rc = {"dataset": "npz", "data-dir": sample_dir, "feature-maps": 8, "lora-rank": 4,
          "num-server-rounds": 1, "method": "flocora", "min-train-nodes": 2,
          "min-available-nodes": 2, "fraction-train": 1.0, "max-examples-per-client": 64,
          "batch-size": 8, "client-threads": 2, "eval-max-examples": 32,
          "partitioner": "iid", "run-dir": str(tmp_path)}
    caps = {"threads": 1, "max-local-steps": 3, "max-data-mb": 0.12}
    _, nodes = run_with_nodes(rc, 2, node_config=[caps, {}])
    capped, free = ([r for r in nodes[n]["reports"] if r["type"] == "train"][0]
                    for n in (101, 102))
    assert capped["threads"] == 1 and free["threads"] == 2
    assert capped["metrics"]["train-steps"] == 3 and free["metrics"]["train-steps"] == 8
    assert capped["metrics"]["num-examples"] == 40 and free["metrics"]["num-examples"] == 64
    assert capped["reply_records"] == free["reply_records"]
    assert sorted(capped["metrics"]) == sorted(free["metrics"])
    for key in caps:
        assert key not in capped["metrics"]
