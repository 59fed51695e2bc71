"""Causal-LM data (``task = "causal-lm"``): instruction, chat and plain-text files, checked row by
row before anything trains, tokenized with the response-only loss mask, partitioned IID, by
Dirichlet over a category column, or naturally by a user/author column.

Files in ``data-dir``: ``train.<ext>`` and optionally ``test.<ext>`` (``jsonl``, ``jsonl.gz``,
``csv``, ``parquet``; without a test file a fixed 10 % of the training rows is held out).
Layouts (``data-format``): ``alpaca`` (loss on ``output`` + EOS), ``chat`` (``messages``; the
tokenizer's chat template, else :func:`fallback_chat`; loss on assistant turns), ``text``.
Bad data is one :class:`~fedlora.tasks.data.DataError` naming the file and the row;
:func:`check_files` runs the checks that need no tokenizer (the launcher, before any process
starts), the task runs the rest when built. Read without torch (pyarrow only for parquet).
Layouts, masks, truncation, packing, partitions: docs/causal-lm.md ("Data").
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import DataError

FORMATS = ("auto", "alpaca", "chat", "text")
EXTENSIONS = (".jsonl", ".jsonl.gz", ".csv", ".parquet")
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0
ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that "
                 "provides further context. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                 "### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n### Instruction:\n"
                          "{instruction}\n\n### Response:\n")

EOS = object()  # marker: the tokenizer's EOS token id


@dataclass(frozen=True)
class Rows:
    """The rows of one file: ``rows[i]`` is a dict; ``where(i)`` names file and row."""

    path: Path
    rows: tuple[dict, ...]
    jsonl: bool

    def where(self, i: int) -> str:
        return f"{self.path}:{i + 1}" if self.jsonl else f"{self.path} row {i + 1}"

    def __len__(self) -> int:
        return len(self.rows)


# ------------------------------------------------------------------------------------ reading


def split_file(d: Path, split: str) -> Path | None:
    """``<split>.<ext>`` in ``d``; a ``<split>.*`` of another type is a DataError."""
    for ext in EXTENSIONS:
        if (d / f"{split}{ext}").is_file():
            return d / f"{split}{ext}"
    others = sorted(p.name for p in d.glob(f"{split}.*"))
    if others:
        raise DataError(f"{d / others[0]}: file type not readable for task 'causal-lm'; use "
                        f"{split}.jsonl, {split}.jsonl.gz, {split}.csv or {split}.parquet")
    return None


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    rows: list[dict] = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    rows.append({})  # keeps line numbers; refused below as a missing column
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{n}: not a JSON object ({e}); a .jsonl file holds "
                                    "one JSON object a line") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{n}: a JSON {type(obj).__name__}, not an object")
                rows.append(obj)
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 JSON lines ({e})") from None
    # blank lines in the middle are refused, trailing ones ignored
    while rows and rows[-1] == {}:
        rows.pop()
    return rows


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [dict(r) for r in csv.DictReader(f)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as UTF-8 CSV with a header row ({e})") from None


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a non-parquet file
        raise DataError(f"{path}: not a parquet file ({type(e).__name__}: {e})") from None


@functools.lru_cache(maxsize=8)
def read_rows(path: str) -> Rows:
    p = Path(path)
    if p.name.endswith((".jsonl", ".jsonl.gz")):
        rows = _read_jsonl(p)
    elif p.suffix == ".csv":
        rows = _read_csv(p)
    elif p.suffix == ".parquet":
        rows = _read_parquet(p)
    else:
        raise DataError(f"{p}: file type not readable for task 'causal-lm' (use .jsonl, "
                        ".jsonl.gz, .csv or .parquet)")
    if not rows:
        raise DataError(f"{p}: no rows")
    return Rows(p, tuple(rows), p.name.endswith((".jsonl", ".jsonl.gz")))


# ------------------------------------------------------------------------------------ checks


def detect_format(rows: Rows) -> str:
    first = rows.rows[0]
    if "messages" in first:
        return "chat"
    if "instruction" in first and "output" in first:
        return "alpaca"
    if "text" in first:
        return "text"
    raise DataError(f"{rows.where(0)}: cannot tell the layout from the columns {sorted(first)}: "
                    "need 'instruction' + 'output' (alpaca), 'messages' (chat) or 'text'")


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def _not_text(v: Any) -> str:
    """'' for a cell that reads as text (a string, a number, null), else what it is: a list or
    an object would otherwise be rendered as its Python repr."""
    if v is None or isinstance(v, (str, int, float)):
        return ""
    return "a list" if isinstance(v, (list, tuple)) else f"a {type(v).__name__}"


def messages_of(rows: Rows, i: int) -> list[dict]:
    """Row ``i``'s chat, checked: a list of {role, content} with at least one non-empty
    assistant turn."""
    msgs = rows.rows[i].get("messages")
    if isinstance(msgs, str):  # CSV: the list as JSON text
        try:
            msgs = json.loads(msgs)
        except ValueError:
            raise DataError(f"{rows.where(i)}: 'messages' is not a JSON list") from None
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise DataError(f"{rows.where(i)}: 'messages' must be a non-empty list of "
                        "{role, content} objects")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{rows.where(i)}: message {j} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{rows.where(i)}: message {j} has role {m['role']!r}, not one of "
                            f"{list(ROLES)}")
        kind = _not_text(m["content"])
        if kind:
            raise DataError(f"{rows.where(i)}: message {j}'s 'content' is {kind}, not text "
                            "(content parts, e.g. images, are not supported)")
        out.append({"role": str(m["role"]), "content": _text(m["content"])})
    answers = [m for m in out if m["role"] == "assistant"]
    if not answers:
        raise DataError(f"{rows.where(i)}: no assistant message (nothing to learn)")
    if any(not m["content"].strip() for m in answers):
        raise DataError(f"{rows.where(i)}: empty response (an assistant message with no "
                        "content)")
    return out


def check_rows(rows: Rows, fmt: str, column: str = "") -> str:
    """Every row of a file checked for layout ``fmt`` (``auto``: detected); returns the layout.
    ``column``: the partition column every row must have."""
    fmt = detect_format(rows) if fmt == "auto" else fmt
    need = {"alpaca": ("instruction", "output"), "chat": ("messages",), "text": ("text",)}[fmt]
    for i, row in enumerate(rows.rows):
        for col in need + ((column,) if column else ()):
            if col not in row or row[col] is None:
                what = "partition column" if col == column and col not in need else "column"
                raise DataError(f"{rows.where(i)}: missing {what} {col!r} (layout {fmt!r} needs "
                                f"{', '.join(need)}; the row has {sorted(row)})")
        for col in need + (("input",) if fmt == "alpaca" else ()):
            kind = _not_text(row.get(col)) if col != "messages" else ""
            if kind:
                raise DataError(f"{rows.where(i)}: column {col!r} holds {kind}, not text")
        if fmt == "alpaca":
            if not _text(row["output"]).strip():
                raise DataError(f"{rows.where(i)}: empty response ('output')")
            if not _text(row["instruction"]).strip():
                raise DataError(f"{rows.where(i)}: empty 'instruction'")
        elif fmt == "chat":
            messages_of(rows, i)
        elif not _text(row["text"]).strip():
            raise DataError(f"{rows.where(i)}: empty 'text'")
    return fmt


def data_files(data_dir: str) -> tuple[Path, Path | None]:
    d = Path(data_dir).expanduser()
    if not data_dir or not d.is_dir():
        raise DataError(f"task 'causal-lm' needs run-config data-dir: a folder with train.jsonl "
                        f"(or .jsonl.gz/.csv/.parquet), got {data_dir!r}")
    train = split_file(d, "train")
    if train is None:
        raise DataError(f"{d}: no train.jsonl, train.jsonl.gz, train.csv or train.parquet")
    return train, split_file(d, "test")


def check_files(data_dir: str, fmt: str = "auto", column: str = "") -> str:
    """The launcher's check (no tokenizer): both files read and every row checked; returns the
    layout. Both files must have the same layout."""
    train, test = data_files(data_dir)
    layout = check_rows(read_rows(str(train)), fmt, column)
    if test is not None:
        other = check_rows(read_rows(str(test)), layout, "")
        if other != layout:
            raise DataError(f"{test}: layout {other!r}, but {train} is {layout!r}")
    return layout


# ------------------------------------------------------------------------------------ splits


def holdout(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of a file with no test split: a fixed 10 % (seed 0)."""
    k = max(1, int(round(HOLDOUT_FRACTION * n))) if n > 1 else 0
    test = np.sort(np.random.default_rng(HOLDOUT_SEED).permutation(n)[:k])
    return np.setdiff1d(np.arange(n), test), test


def split_rows(data_dir: str, split: str) -> tuple[Rows, np.ndarray]:
    """The file a split reads and the rows of it that belong to the split."""
    train, test = data_files(data_dir)
    if test is not None:
        rows = read_rows(str(train if split == "train" else test))
        return rows, np.arange(len(rows))
    rows = read_rows(str(train))
    tr, te = holdout(len(rows))
    return rows, tr if split == "train" else te


# ------------------------------------------------------------------------------------ rendering


def alpaca_segments(row: dict) -> list[tuple[Any, bool]]:
    inp = _text(row.get("input")).strip()
    tmpl = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
    prompt = tmpl.format(instruction=_text(row["instruction"]).strip(), input=inp)
    return [(prompt, False), (_text(row["output"]), True), (EOS, True)]


def fallback_chat(messages: list[dict]) -> list[tuple[Any, bool]]:
    """The chat rendering for a tokenizer without a chat template: ``### Role:\\n<content>\\n\\n``
    per message; an assistant turn is ``### Assistant:\\n`` (no loss) then its content and EOS
    (loss)."""
    segs: list[tuple[Any, bool]] = []
    for j, m in enumerate(messages):
        if m["role"] == "assistant":
            segs += [("### Assistant:\n", False), (m["content"], True), (EOS, True)]
            if j + 1 < len(messages):
                segs.append(("\n\n", False))
        else:
            segs.append((f"### {m['role'].capitalize()}:\n{m['content']}\n\n", False))
    return segs


def template_chat(tokenizer, messages: list[dict], where: str) -> list[tuple[Any, bool]]:
    """Segments from the tokenizer's chat template: each assistant turn is what rendering the
    chat through it adds to the rendering up to it with the generation prompt (loss); the rest
    has no loss. The template must render every prefix of the chat as a prefix of the whole."""
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    segs: list[tuple[Any, bool]] = []
    done = ""
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:j], True), render(messages[: j + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{where}: the tokenizer's chat template does not render this chat's "
                            "prefixes as prefixes of it (cannot mark the assistant turns); use "
                            "a model whose template does, or the alpaca layout")
        segs += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    whole = render(messages, False)
    if whole.startswith(done) and len(whole) > len(done):
        segs.append((whole[len(done):], False))
    return segs


def segments(rows: Rows, i: int, fmt: str, tokenizer) -> list[tuple[Any, bool]]:
    row = rows.rows[i]
    if fmt == "alpaca":
        return alpaca_segments(row)
    if fmt == "text":
        return [(_text(row["text"]), True)]
    msgs = messages_of(rows, i)
    if getattr(tokenizer, "chat_template", None):
        return template_chat(tokenizer, msgs, rows.where(i))
    return fallback_chat(msgs)


def bos_prefix(tokenizer, fmt: str) -> list[int]:
    """The BOS a sequence starts with: the tokenizer's, when it has one distinct from EOS, except
    for a chat template (it writes its own)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if fmt == "chat" and getattr(tokenizer, "chat_template", None):
        return []
    return [int(bos)] if bos is not None and bos != eos else []


def encode_segments(tokenizer, segs, prefix: list[int]) -> tuple[list[int], list[int]]:
    """Token ids and labels (−100 where there is no loss) of one example, untruncated."""
    ids, labels = list(prefix), [-100] * len(prefix)
    eos = tokenizer.eos_token_id
    for text, trained in segs:
        if text is EOS:
            toks = [int(eos)] if eos is not None else []
        elif text:
            toks = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        else:
            toks = []
        ids += toks
        labels += toks if trained else [-100] * len(toks)
    return ids, labels


@dataclass
class Encoded:
    """One split tokenized: per-example ids / labels (truncated to max-length), the prompt length
    of each (tokens before the first trained one) and each row's partition group."""

    ids: list[list[int]]
    labels: list[list[int]]
    prompt_len: list[int]
    groups: list[str]
    fmt: str


def encode_rows(rows: Rows, idx: np.ndarray, fmt: str, tokenizer, max_length: int,
                column: str = "") -> Encoded:
    """Tokenize rows ``idx``, truncating each example to its first ``max_length`` tokens. An
    example left with no trained token (its response starts at or after ``max-length``) is a
    DataError naming the first such rows."""
    fmt = check_rows(rows, fmt, column)
    prefix = bos_prefix(tokenizer, fmt)
    out = Encoded([], [], [], [], fmt)
    cut: list[tuple[int, int]] = []
    for i in np.asarray(idx, dtype=np.int64).tolist():
        ids, labels = encode_segments(tokenizer, segments(rows, i, fmt, tokenizer), prefix)
        first = next((k for k, v in enumerate(labels) if v != -100), len(labels))
        # the first token with a loss (position 0 is never predicted)
        pred = next((k for k in range(1, len(labels)) if labels[k] != -100), len(labels))
        if pred >= max_length:
            cut.append((i, pred))
            continue
        out.ids.append(ids[:max_length])
        out.labels.append(labels[:max_length])
        out.prompt_len.append(first)
        out.groups.append(_text(rows.rows[i].get(column)) if column else "")
    if cut:
        i, first = cut[0]
        raise DataError(f"{rows.where(i)}: the response starts at token {first}, at or after "
                        f"max-length {max_length}, so truncation leaves nothing to learn "
                        f"({len(cut)} such row(s) of {len(idx)}); raise max-length or shorten "
                        "those prompts")
    return out


# ------------------------------------------------------------------------------------ partitions


def natural_partition(groups: list[str], num_partitions: int, partition_id: int, seed: int
                      ) -> np.ndarray:
    """LEAF-style natural partition: every distinct value of the partition column (a user, an
    author, a speaking role) belongs to one partition, whole; the sorted values are shuffled by
    ``seed`` and dealt round-robin (one user per partition when there are as many)."""
    users = sorted(set(groups))
    if len(users) < num_partitions:
        raise DataError(f"partitioner 'natural': {len(users)} distinct values of the partition "
                        f"column for {num_partitions} partitions (each needs one at least)")
    order = np.random.default_rng(seed).permutation(len(users))
    mine = {users[j] for pos, j in enumerate(order) if pos % num_partitions == partition_id}
    return np.asarray([i for i, g in enumerate(groups) if g in mine], dtype=np.int64)


def check_natural(data_dir: str, column: str, num_partitions: int) -> None:
    """The launcher's check of ``partitioner='natural'`` (no tokenizer): the training rows hold
    at least one distinct value of ``column`` per partition; DataError naming the file
    otherwise (a node left without one would fail in its first round, after training began)."""
    rows, idx = split_rows(data_dir, "train")
    users = {_text(rows.rows[i].get(column)) for i in idx.tolist()}
    if len(users) < num_partitions:
        raise DataError(f"{rows.path}: partitioner 'natural': {len(users)} distinct value(s) of "
                        f"partition column {column!r} in the training rows for "
                        f"{num_partitions} partitions (each needs one at least): fewer nodes, "
                        "or another partitioner")


def category_labels(groups: list[str]) -> np.ndarray:
    """Dirichlet / pathological partitioning: the category column's values as class indices
    (sorted order)."""
    index = {v: i for i, v in enumerate(sorted(set(groups)))}
    return np.asarray([index[g] for g in groups], dtype=np.int64)


# ------------------------------------------------------------------------------------ packing


def pack(ids: list[list[int]], labels: list[list[int]], max_length: int
         ) -> tuple[list[list[int]], list[list[int]]]:
    """Concatenate the examples (in order) into one stream and cut it into ``max_length``
    chunks (the last one shorter). Attention crosses example boundaries within a chunk (plain
    packing, as trl's ``packing=True`` without position resets)."""
    flat_ids = [t for seq in ids for t in seq]
    flat_lab = [t for seq in labels for t in seq]
    out_i, out_l = [], []
    for s in range(0, len(flat_ids), max_length):
        chunk = flat_lab[s: s + max_length]
        if any(v != -100 for v in chunk[1:]):  # a chunk must have a predicted token
            out_i.append(flat_ids[s: s + max_length])
            out_l.append(chunk)
    return out_i, out_l
