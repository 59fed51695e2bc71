"""Offline loaders for every supported layout, and flwr-datasets partitioning."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from fedlora.tasks.data import DataError, load_images, partition_indices

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _sample(sample_dir):
    with np.load(Path(sample_dir) / "train.npz") as z:
        return z["x"], z["y"]


def test_npz_sample_is_real_fashion_mnist(sample_dir):
    tr = load_images("npz", sample_dir, "train")
    te = load_images("npz", sample_dir, "test")
    assert tr.x.shape == (800, 28, 28, 1) and te.x.shape == (400, 28, 28, 1)
    assert np.bincount(tr.y).tolist() == [80] * 10 and tr.num_classes == 10
    assert 60 < tr.x.mean() < 90  # Fashion-MNIST's mean pixel is ~73


def test_idx_layout(tmp_path, sample_dir):
    x, y = _sample(sample_dir)
    for prefix, (xs, ys) in {"train": (x, y), "t10k": (x[:50], y[:50])}.items():
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in xs.shape)
                    + xs.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + len(ys).to_bytes(4, "big") + ys.astype(np.uint8).tobytes())
    tr = load_images("fashion-mnist", str(tmp_path), "train")
    te = load_images("fashion-mnist", str(tmp_path), "test")
    assert (tr.x[..., 0] == x).all() and (tr.y == y).all() and len(te.y) == 50


def test_cifar_pickle_layout(tmp_path, sample_dir):
    x, y = _sample(sample_dir)
    rgb = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)  # 32x32x3
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        part = slice(i * 100, i * 100 + 100)
        data = rgb[part].transpose(0, 3, 1, 2).reshape(100, -1)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": y[part].tolist()}, f)
    tr = load_images("cifar10", str(tmp_path), "train")
    assert tr.x.shape == (500, 32, 32, 3) and (tr.x == rgb[:500]).all() and (tr.y == y[:500]).all()


@pytest.mark.skipif(not (SHARED / "cifar10" / "test.npz").exists(), reason="no shared CIFAR-10")
def test_shared_cifar10_npz():
    te = load_images("cifar10", str(SHARED / "cifar10"), "test")
    assert te.x.shape == (10000, 32, 32, 3) and te.num_classes == 10


def test_missing_dir_names_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_images("cifar10", str(tmp_path / "nope"), "train")
    with pytest.raises(DataError, match="holds no dataset"):
        load_images("cifar10", str(tmp_path), "train")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partitions_disjoint_cover_and_deterministic(sample_dir, scheme):
    _, y = _sample(sample_dir)
    parts = [partition_indices(y, 5, i, scheme, alpha=0.5, seed=7) for i in range(5)]
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)                  # disjoint
    if scheme != "pathological":
        assert len(flat) == len(y)                            # cover everything
    again = partition_indices(y, 5, 2, scheme, alpha=0.5, seed=7)
    assert (again == parts[2]).all()
    if scheme == "pathological":
        assert all(len(np.unique(y[p])) <= 2 for p in parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
@pytest.mark.parametrize("n", [7, 300])
def test_bulk_partitions_are_exactly_flwr_datasets_load_partition(sample_dir, scheme, n):
    """The bulk read of every partition (data._compute_partitions) returns, for every
    partition-id, what flwr-datasets' own ``load_partition`` returns — the same partitioner,
    read once instead of once per partition (n=7: shards of unequal size; n=300: many empty)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner,
                                           PathologicalPartitioner)

    from fedlora.tasks.data import _compute_partitions

    _, y = _sample(sample_dir)
    labels = tuple(int(v) for v in y)
    bulk = _compute_partitions(labels, n, scheme, 0.5, 7, 2)
    ds = Dataset.from_dict({"label": list(labels), "idx": list(range(len(labels)))})
    part = {"iid": lambda: IidPartitioner(n),
            "dirichlet": lambda: DirichletPartitioner(n, "label", 0.5, min_partition_size=0,
                                                      self_balancing=False, seed=7),
            "pathological": lambda: PathologicalPartitioner(
                n, "label", 2, class_assignment_mode="deterministic", seed=7)}[scheme]()
    part.dataset = ds.shuffle(seed=7) if scheme == "iid" else ds
    assert len(bulk) == n
    for i in range(n):
        assert bulk[i].tolist() == list(part.load_partition(i)["idx"]), i


def test_dirichlet_is_skewed_and_seeded(sample_dir):
    _, y = _sample(sample_dir)
    a = [partition_indices(y, 4, i, "dirichlet", alpha=0.05, seed=1) for i in range(4)]
    b = [partition_indices(y, 4, i, "dirichlet", alpha=0.05, seed=2) for i in range(4)]
    # strong skew: some partition is dominated by few classes
    top_share = max(np.bincount(y[p], minlength=10).max() / max(len(p), 1) for p in a if len(p))
    assert top_share > 0.5
    assert any(len(p) != len(q) or (p != q).any() for p, q in zip(a, b))
    with pytest.raises(ValueError, match="partition-id"):
        partition_indices(y, 4, 4)


def test_partitions_are_computed_once_per_machine_and_shared(sample_dir, tmp_path, monkeypatch):
    """The first process stores every partition (<key>.npz); another process (here: a cleared
    in-process cache) loads them without computing; a different alpha or seed is another key;
    a damaged file is recomputed, not trusted."""
    from fedlora.tasks import data

    _, y = _sample(sample_dir)
    monkeypatch.setenv("FEDLORA_PARTITION_CACHE", str(tmp_path))
    data._partitions.cache_clear()
    first = [partition_indices(y, 6, i, "dirichlet", alpha=0.3, seed=5) for i in range(6)]
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1

    def no_compute(*a, **k):
        raise AssertionError("partitions recomputed although cached")

    data._partitions.cache_clear()
    monkeypatch.setattr(data, "_compute_partitions", no_compute)
    again = [partition_indices(y, 6, i, "dirichlet", alpha=0.3, seed=5) for i in range(6)]
    assert all((p == q).all() for p, q in zip(first, again))
    monkeypatch.undo()
    monkeypatch.setenv("FEDLORA_PARTITION_CACHE", str(tmp_path))
    data._partitions.cache_clear()
    partition_indices(y, 6, 0, "dirichlet", alpha=0.3, seed=6)
    assert len(list(tmp_path.glob("*.npz"))) == 2            # another seed, another file
    np.savez(files[0], offsets=np.array([0, 5]), idx=np.arange(5))  # wrong partition count
    data._partitions.cache_clear()
    fixed = [partition_indices(y, 6, i, "dirichlet", alpha=0.3, seed=5) for i in range(6)]
    assert all((p == q).all() for p, q in zip(first, fixed))
    data._partitions.cache_clear()


def test_min_partition_size_redraws_empty_clients_and_keeps_draws_that_meet_it(monkeypatch):
    """``min-partition-size``: a Dirichlet draw that leaves a partition below the minimum is
    redrawn (no client is silently given zero examples); a draw that already meets it is the
    very draw ``min-partition-size=0`` gives, so runs without empty clients are unchanged; an
    impossible minimum is a DataError naming the key and the fix."""
    from fedlora.tasks import data

    monkeypatch.setenv("FEDLORA_PARTITION_CACHE", "")
    five = tuple(np.repeat(np.arange(5), 100).tolist())      # 5 classes, as BBC News
    empty = data._compute_partitions(five, 6, "dirichlet", 0.01, 1, 2, 0)
    assert min(len(p) for p in empty) == 0                   # Dir(0.01), 6 clients: one empty
    redrawn = data._compute_partitions(five, 6, "dirichlet", 0.01, 1, 2, 1)
    assert min(len(p) for p in redrawn) >= 1
    assert sorted(np.concatenate(redrawn).tolist()) == list(range(500))
    ten = tuple(np.repeat(np.arange(10), 200).tolist())
    for seed in (1, 2):
        a = data._compute_partitions(ten, 10, "dirichlet", 0.5, seed, 2, 0)
        b = data._compute_partitions(ten, 10, "dirichlet", 0.5, seed, 2, 1)
        assert min(len(p) for p in a) >= 1
        assert all(np.array_equal(p, q) for p, q in zip(a, b))
    with pytest.raises(DataError, match="min-partition-size=400"):
        data._compute_partitions(five, 6, "dirichlet", 0.01, 1, 2, 400)
    with pytest.raises(DataError, match="min-partition-size=2"):   # iid: 3 examples, 2 parts
        data._compute_partitions((0, 1, 0), 2, "iid", 0.5, 1, 2, 2)
