"""Image data loading (offline first) and flwr-datasets partitioning.

Formats understood by :func:`load_images`:

* ``fashion-mnist``: the four IDX files (``*-idx?-ubyte[.gz]``) in ``data-dir``, by default
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
* ``cifar10``: ``data-dir`` holding the python-pickle layout (``cifar-10-batches-py/`` or its
  content), or ``train.npz``/``test.npz`` (keys ``x`` uint8 NHWC and ``y``), or Hugging Face
  parquet files (``train-*.parquet``/``test-*.parquet``, columns ``img``/``label``); with no
  ``data-dir`` it is loaded from the Hugging Face hub (``uoft-cs/cifar10``) when online.
* ``npz``: any image dataset as ``train.npz``/``test.npz`` with ``x`` (N,H,W[,C]) uint8 and ``y``.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DataError(RuntimeError):
    """A dataset could not be found or read; the message says what and where."""


@dataclass(frozen=True)
class ImageSplit:
    x: np.ndarray  # uint8 (N, H, W, C)
    y: np.ndarray  # int64 (N,)
    num_classes: int

    @property
    def channels(self) -> int:
        return int(self.x.shape[-1])

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean/std in [0, 1] (computed on a fixed subsample for speed)."""
        sub = self.x[:: max(1, len(self.x) // 10000)].astype(np.float32) / 255.0
        return sub.mean(axis=(0, 1, 2)), sub.std(axis=(0, 1, 2)) + 1e-6


def _as_nhwc(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8:
        raise DataError(f"images must be uint8 (N,H,W[,C]); got {x.dtype} {x.shape}")
    return x


def _split(x: np.ndarray, y: np.ndarray) -> ImageSplit:
    x, y = _as_nhwc(x), np.asarray(y).astype(np.int64).reshape(-1)
    if len(x) != len(y):
        raise DataError(f"{len(x)} images but {len(y)} labels")
    return ImageSplit(x, y, int(y.max()) + 1 if len(y) else 0)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims}, file has {arr.size} values")
    return arr.reshape(dims)


def _find(d: Path, stem: str) -> Path:
    for cand in (d / stem, d / f"{stem}.gz"):
        if cand.exists():
            return cand
    raise DataError(f"missing {stem}[.gz] in {d}")


def load_fashion_mnist(d: Path, split: str) -> ImageSplit:
    prefix = "train" if split == "train" else "t10k"
    x = _read_idx(_find(d, f"{prefix}-images-idx3-ubyte"))
    y = _read_idx(_find(d, f"{prefix}-labels-idx1-ubyte"))
    return _split(x, y)


def load_npz(d: Path, split: str) -> ImageSplit:
    p = d / f"{split}.npz"
    if not p.exists():
        raise DataError(f"missing {p}")
    with np.load(p, allow_pickle=False) as z:
        if "x" not in z or "y" not in z:
            raise DataError(f"{p} must hold arrays 'x' and 'y', has {list(z.keys())}")
        return _split(z["x"], z["y"])


def load_cifar_pickles(d: Path, split: str) -> ImageSplit:
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        with open(_find(d, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[b"labels"]))
    return _split(np.concatenate(xs), np.concatenate(ys))


def _decode_images(values) -> np.ndarray:
    from PIL import Image

    out = []
    for v in values:
        raw = v["bytes"] if isinstance(v, dict) else v
        out.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    return np.stack(out)


def load_parquet(d: Path, split: str) -> ImageSplit:
    files = sorted(d.glob(f"**/{split}-*.parquet")) or sorted(d.glob(f"**/{split}.parquet"))
    if not files:
        raise DataError(f"no {split}-*.parquet under {d}")
    import pyarrow.parquet as pq

    table = pq.read_table(files).to_pydict()
    img_col = next((c for c in ("img", "image") if c in table), None)
    lab_col = next((c for c in ("label", "labels", "fine_label") if c in table), None)
    if img_col is None or lab_col is None:
        raise DataError(f"{files[0]}: need an img/image and a label column, has {list(table)}")
    return _split(_decode_images(table[img_col]), np.asarray(table[lab_col]))


def load_hub(repo: str, split: str) -> ImageSplit:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"no local data-dir given for {repo!r} and the hub is switched off "
                        "(HF_*_OFFLINE=1); set run-config data-dir to a local copy")
    from datasets import load_dataset

    ds = load_dataset(repo, split=split)
    img_col = "img" if "img" in ds.column_names else "image"
    return _split(np.stack([np.asarray(im.convert("RGB")) for im in ds[img_col]]),
                  np.asarray(ds["label"]))


def _detect_dir_format(d: Path, split: str = "train") -> str:
    """The layout of ``d``, judged by the files of ``split`` alone: central evaluation (the
    SuperLink's host) needs only the test split, a node only the train split."""
    if (d / "cifar-10-batches-py").is_dir() or (d / "data_batch_1").exists() \
            or (d / "test_batch").exists():
        return "pickle"
    if (d / f"{split}.npz").exists():
        return "npz"
    if list(d.glob(f"**/{split}-*.parquet")) or list(d.glob(f"**/{split}.parquet")):
        return "parquet"
    if list(d.glob(f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte*")):
        return "idx"
    want = {"train": "train.npz, train-*.parquet, data_batch_*, train-images-idx3-ubyte",
            "test": "test.npz, test-*.parquet, test_batch, t10k-images-idx3-ubyte"}[split]
    raise DataError(f"{d} holds no dataset I can read for the {split} split (looked for "
                    f"{want}; or cifar-10-batches-py/)")


@functools.lru_cache(maxsize=4)
def load_images(dataset: str, data_dir: str, split: str) -> ImageSplit:
    """Load one split (``train``/``test``) of an image dataset; cached per process."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    if dataset == "fashion-mnist" and not data_dir:
        data_dir = FASHION_MNIST_DIR
    if not data_dir:
        hub = {"cifar10": "uoft-cs/cifar10"}.get(dataset)
        if hub is None:
            raise DataError(f"dataset {dataset!r} needs run-config data-dir (a local folder)")
        return load_hub(hub, split)
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        hint = " (install it: apt-get install dataset-fashion-mnist)" if dataset == "fashion-mnist" else ""
        raise DataError(f"data-dir {str(d)!r} for dataset {dataset!r} does not exist{hint}")
    loader = {"pickle": load_cifar_pickles, "npz": load_npz, "parquet": load_parquet,
              "idx": load_fashion_mnist}[_detect_dir_format(d, split)]
    return loader(d, split)


# ---------------------------------------------------------------------------------------------
# partitioning with flwr-datasets


def partition_indices(
    labels: np.ndarray, num_partitions: int, partition_id: int, scheme: str = "dirichlet",
    alpha: float = 0.5, seed: int = 42, classes_per_partition: int = 2, min_size: int = 0,
) -> np.ndarray:
    """Indices of ``partition_id``'s share, using flwr-datasets partitioners on a local
    ``datasets.Dataset``; deterministic in ``seed``. Every partition holds at least
    ``min_size`` examples (run-config ``min-partition-size``), else a :class:`DataError`."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    return _partitions(tuple(int(v) for v in labels), num_partitions, scheme, float(alpha),
                       seed, classes_per_partition, int(min_size))[partition_id]


def partition_cache_dir() -> Path | None:
    """Where computed partitions are shared between the processes of a run (every simulation
    actor and SuperNode on the machine): ``FEDLORA_PARTITION_CACHE`` (empty: no disk cache),
    else ``$XDG_CACHE_HOME/fedlora/partitions`` (default ``~/.cache/...``)."""
    env = os.environ.get("FEDLORA_PARTITION_CACHE")
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedlora" / "partitions"


@functools.lru_cache(maxsize=8)
def _partitions(labels: tuple, num_partitions: int, scheme: str, alpha: float, seed: int,
                classes_per_partition: int, min_size: int = 0) -> list[np.ndarray]:
    """Every partition's indices, computed once per machine: the first process computes them
    under a file lock and stores them (``<key>.npz``, key = SHA-256 of the labels and every
    partitioning parameter); the others load that file. A file that does not hold a valid
    partitioning of these labels is recomputed."""
    import fcntl
    import hashlib

    d = partition_cache_dir()
    args = (num_partitions, scheme, alpha, seed, classes_per_partition, min_size)
    if d is None:
        return _compute_partitions(labels, *args)
    lab = np.asarray(labels, dtype=np.int64)
    key = hashlib.sha256(lab.tobytes() + repr(("v2",) + args).encode()).hexdigest()[:32]
    path = d / f"{key}.npz"
    try:
        d.mkdir(parents=True, exist_ok=True)
        lock = open(d / f"{key}.lock", "w")
    except OSError:  # read-only home: compute in this process
        return _compute_partitions(labels, *args)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # one process computes, the others wait and load
        parts = _load_partitions(path, len(lab), num_partitions)
        if parts is None:
            parts = _compute_partitions(labels, *args)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            try:
                np.savez(tmp, offsets=np.cumsum([0] + [len(p) for p in parts]),
                         idx=np.concatenate(parts) if parts else np.zeros(0, np.int64))
                os.replace(tmp, path)
            except OSError:  # full disk: keep what was computed, share nothing
                tmp.unlink(missing_ok=True)
        return parts


def _load_partitions(path: Path, n_labels: int, num_partitions: int) -> list[np.ndarray] | None:
    """The partitions stored at ``path``, or None if absent or not a partitioning of
    ``n_labels`` examples into ``num_partitions`` (offsets ascending, indices in range)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            offsets, idx = z["offsets"].astype(np.int64), z["idx"].astype(np.int64)
    except (OSError, KeyError, ValueError):
        return None
    if (offsets.shape != (num_partitions + 1,) or offsets[0] != 0 or offsets[-1] != idx.size
            or np.any(np.diff(offsets) < 0) or idx.size > n_labels
            or (idx.size and (idx.min() < 0 or idx.max() >= n_labels))):
        return None
    return [idx[offsets[i]:offsets[i + 1]] for i in range(num_partitions)]


def _compute_partitions(labels: tuple, num_partitions: int, scheme: str, alpha: float,
                        seed: int, classes_per_partition: int, min_size: int = 0
                        ) -> list[np.ndarray]:
    parts = _draw_partitions(labels, num_partitions, scheme, alpha, seed, classes_per_partition,
                             min_size)
    small = [i for i, p in enumerate(parts) if len(p) < min_size]
    if small:
        raise DataError(
            f"partitioner {scheme!r} over {num_partitions} partitions of {len(labels)} examples "
            f"left partition(s) {small[:10]} with fewer than min-partition-size={min_size} "
            f"examples (sizes {[len(parts[i]) for i in small[:10]]}): use fewer partitions, "
            "a larger dirichlet-alpha, or min-partition-size=0 to allow empty clients")
    return parts


def _draw_partitions(labels: tuple, num_partitions: int, scheme: str, alpha: float,
                     seed: int, classes_per_partition: int, min_size: int
                     ) -> list[np.ndarray]:
    try:
        from datasets import Dataset
        from flwr_datasets.partitioner import (
            DirichletPartitioner, IidPartitioner, PathologicalPartitioner,
        )
    except ImportError:  # a slim node image (docs/edge.md): the same partitions in numpy
        return draw_partitions_numpy(labels, num_partitions, scheme, alpha, seed,
                                     classes_per_partition, min_size)

    # All partitions at once: ``load_partition(i)`` builds a Dataset per call (~8.5 ms each:
    # 85 s of round 1 at 10,000 nodes). The partitioners' own assignment, read in bulk, is the
    # same (tests/test_data.py compares with load_partition).
    ds = Dataset.from_dict({"label": list(labels), "idx": list(range(len(labels)))})
    if scheme == "iid":  # IidPartitioner: ds.shard(N, i, contiguous=True) of the shuffled data
        IidPartitioner(num_partitions)  # its own check of N
        order = np.asarray(ds.shuffle(seed=seed)["idx"], dtype=np.int64)
        div, mod = divmod(order.size, num_partitions)
        return [order[div * i + min(i, mod): div * (i + 1) + min(i + 1, mod)]
                for i in range(num_partitions)]
    if scheme == "dirichlet":
        # flwr-datasets redraws (up to 10 times) while a partition is below the minimum; a
        # first draw that meets it is the draw min_partition_size=0 gives (same partitions)
        part = DirichletPartitioner(num_partitions, "label", alpha, min_partition_size=min_size,
                                    self_balancing=False, seed=seed)
    elif scheme == "pathological":
        part = PathologicalPartitioner(num_partitions, "label", classes_per_partition,
                                       class_assignment_mode="deterministic", seed=seed)
    else:
        raise ValueError(f"partitioner must be iid, dirichlet or pathological, got {scheme!r}")
    part.dataset = ds
    try:
        with warnings.catch_warnings():  # one warning per redraw; the outcome is what counts
            warnings.filterwarnings("ignore", "The specified min_partition_size")
            part.load_partition(0)  # computes every partition's indices
    except ValueError as err:
        if "max number of attempts" not in str(err):
            raise
        raise DataError(
            f"Dirichlet({alpha}) over {num_partitions} partitions left a partition below "
            f"min-partition-size={min_size} in 10 draws: use fewer partitions, a larger "
            "dirichlet-alpha, or min-partition-size=0 to allow empty clients") from None
    table = part._partition_id_to_indices  # positions in ds, whose "idx" column is the position
    return [np.asarray(table[i], dtype=np.int64) for i in range(num_partitions)]


def draw_partitions_numpy(labels, num_partitions: int, scheme: str, alpha: float, seed: int,
                          classes_per_partition: int, min_size: int) -> list[np.ndarray]:
    """The partitions :func:`_draw_partitions` gets from flwr-datasets (IID shard of a seeded
    permutation; ``DirichletPartitioner(self_balancing=False)``; ``PathologicalPartitioner(
    class_assignment_mode="deterministic")``; both with their default shuffle), drawn with numpy
    alone, for nodes without ``datasets``/``pyarrow`` (the slim node image). The same random
    draws in the same order: ``tests/test_data.py`` checks index for index that both give the
    same partitions (and the same errors)."""
    y = np.asarray(labels, dtype=np.int64)
    n = int(y.size)
    if num_partitions <= 0:
        raise ValueError(f"num_partitions must be > 0, got {num_partitions}")
    if scheme == "iid":
        order = np.random.default_rng(seed).permutation(n).astype(np.int64)
        div, mod = divmod(order.size, num_partitions)
        return [order[div * i + min(i, mod): div * (i + 1) + min(i + 1, mod)]
                for i in range(num_partitions)]
    if scheme not in ("dirichlet", "pathological"):
        raise ValueError(f"partitioner must be iid, dirichlet or pathological, got {scheme!r}")
    if num_partitions > n:
        raise ValueError("The number of partitions needs to be smaller than the number of "
                         "samples in the dataset.")
    rng = np.random.default_rng(seed=seed)
    classes = sorted(set(y.tolist()))
    if scheme == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
        alphas = np.full(num_partitions, float(alpha))
        for attempt in range(11):  # flwr-datasets: the first draw and up to 10 redraws
            parts: list[list[int]] = [[] for _ in range(num_partitions)]
            for k in classes:
                members = np.nonzero(y == k)[0]
                cuts = (np.cumsum(rng.dirichlet(alphas)) * len(members)).astype(int)[:-1]
                for part, chunk in zip(parts, np.split(members, cuts)):
                    part.extend(chunk.tolist())
            if min(len(p) for p in parts) >= min_size:
                break
        else:
            raise DataError(
                f"Dirichlet({alpha}) over {num_partitions} partitions left a partition below "
                f"min-partition-size={min_size} in 10 draws: use fewer partitions, a larger "
                "dirichlet-alpha, or min-partition-size=0 to allow empty clients")
    else:
        if classes_per_partition > len(classes):
            raise ValueError(f"classes-per-partition={classes_per_partition} is greater than "
                             f"the {len(classes)} classes of the dataset")
        owned = [[classes[(p + i) % len(classes)] for i in range(classes_per_partition)]
                 for p in range(num_partitions)]
        times = {k: sum(k in o for o in owned) for k in classes}
        for k in classes:
            if times[k] > int(np.sum(y == k)):
                raise ValueError(f"label {k} is needed in {times[k]} partitions but has only "
                                 f"{int(np.sum(y == k))} examples")
        parts = [[] for _ in range(num_partitions)]
        for k in classes:
            if times[k] == 0:
                continue
            chunks = iter(np.array_split(np.where(y == k)[0], times[k]))
            for p in range(num_partitions):
                if k in owned[p]:
                    parts[p].extend(next(chunks))
    for part in parts:  # both partitioners shuffle each partition with the same generator
        rng.shuffle(part)
    return [np.asarray(p, dtype=np.int64) for p in parts]
