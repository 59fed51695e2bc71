"""The causal-LM task (``task = "causal-lm"``): LoRA fine-tuning of any local Hugging Face causal
language model on instruction, chat or plain-text data.

* Model: ``AutoModelForCausalLM`` from run-config ``model`` (a local folder), float32 on the CPU
  (bit-identical on every node, fingerprint checked), or a 4/8-bit base through bitsandbytes on
  CUDA (``quantize``). LoRA on every projection of every block (:mod:`.lora_targets`) or on
  ``lora-targets``; nothing else trains or travels.
* Data: :mod:`.lm_data`; every row of both splits is checked and tokenized when the task is
  built (the ServerApp, before round 1), so bad data stops the run before training.
* Loops: AdamW on the mean cross-entropy of the labelled tokens. Central evaluation records
  ``loss``, ``perplexity`` = exp(loss) and ``accuracy`` (greedy next-token hits on labelled
  tokens); ``generate-prompts`` > 0 writes greedy continuations to ``<run>/generations.jsonl``.
  Details: docs/causal-lm.md ("Model and LoRA targets", "Evaluation").
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import lm_data, lora_targets
from .loop import make_optimizer, model_device, to_device, train_epochs
from .task import TaskBase, TrainSettings
from .text import _autocast, _quiet_transformers

CAUSAL_LORA_ALPHA = 16.0
QUANTIZE = ("none", "4bit", "8bit")
PROMPT_TOKENS_OF_TEXT = 16  # generation prompt of a `text` row: its first 16 tokens


def resolve_model(name: str) -> str:
    p = Path(name.strip()).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"model folder {str(p)!r} holds no config.json (not a Hugging Face "
                             "model folder)")
        return str(p.resolve())
    if name.strip().lower() in ("", "resnet8", "resnet18", "minilm"):
        raise ValueError(f"task 'causal-lm' needs run-config model = a local Hugging Face "
                         f"causal-LM folder (config.json, weights, tokenizer), got {name!r}")
    return name.strip()


@dataclass(frozen=True)
class CausalModelConfig:
    path: str
    lora_rank: int = 8
    lora_alpha: float = 0.0
    targets: tuple[str, ...] = ()
    seed: int = 0
    quantize: str = "none"
    gradient_checkpointing: bool = False
    device: str = "cpu"

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha > 0 else CAUSAL_LORA_ALPHA


def quantization_config(kind: str):
    """bitsandbytes config of ``quantize`` (4-bit NF4 with bf16 compute, double quantization,
    as QLoRA; or 8-bit); refuses where it cannot run."""
    if kind == "none":
        return None
    if not torch.cuda.is_available():
        raise ValueError(f"quantize={kind!r} needs a CUDA GPU (bitsandbytes); this node has "
                         "none: use quantize='none'")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"quantize={kind!r} needs bitsandbytes: pip install "
                         "'fedlora[qlora]'") from None
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def build_base(mcfg: CausalModelConfig) -> nn.Module:
    """The frozen causal LM, identical on every node."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32}
    qcfg = quantization_config(mcfg.quantize)
    if qcfg is not None:
        dev = torch.device(mcfg.device if mcfg.device not in ("auto", "cpu") else "cuda")
        kwargs = {"quantization_config": qcfg, "device_map": {"": dev.index or 0},
                  "dtype": torch.bfloat16}
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(mcfg.seed)  # anything missing from the checkpoint
        try:
            model = AutoModelForCausalLM.from_pretrained(mcfg.path, **kwargs)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot load causal LM {mcfg.path!r} (a local folder with "
                               f"config.json and weights; offline?): {e}") from e
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if qcfg is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=mcfg.gradient_checkpointing)
    elif mcfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_model(mcfg: CausalModelConfig, adapter: bool) -> nn.Module:
    """LoRA model (``adapter``) or the fully fine-tuned model (FedAvg: every weight trains)."""
    model = build_base(mcfg)
    if adapter:
        return lora_targets.wrap(model, mcfg.lora_rank, mcfg.alpha, mcfg.targets, seed=mcfg.seed)
    if mcfg.quantize != "none":
        raise ValueError("a quantized base cannot be fully fine-tuned: use a LoRA method")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@functools.lru_cache(maxsize=2)
def tokenizer_for(path: str):
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot load the tokenizer of {path!r}: {e}") from e
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer of {path!r} has no EOS token (needed to end responses)")
    return tok


def max_positions(path: str) -> int | None:
    """The longest sequence the model's config allows (None: not stated, e.g. RoPE models
    without a limit)."""
    from transformers import AutoConfig

    with _quiet_transformers():
        cfg = AutoConfig.from_pretrained(path)
    for key in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def pad_id(tok) -> int:
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


# ---------------------------------------------------------------------------------------------
# tensors


def to_tensors(ids: list[list[int]], labels: list[list[int]], pad: int
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` and labels (−100 on padding)."""
    n, length = len(ids), max((len(s) for s in ids), default=1)
    x = torch.full((n, length), pad, dtype=torch.long)
    y = torch.full((n, length), -100, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(ids, labels)):
        x[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        y[i, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": x, "attention_mask": mask}, y


def batch_of(feats: dict[str, torch.Tensor], y: torch.Tensor, idx
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows ``idx``, trimmed to their longest sequence."""
    mask = feats["attention_mask"][idx]
    length = max(int(mask.sum(1).max()), 1) if len(mask) else 1
    return {k: v[idx][:, :length] for k, v in feats.items()}, y[idx][:, :length]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy of next-token prediction (0 where the label is −100) and the
    mask of labelled positions, both ``(B, L−1)``."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=-100, reduction="none").view(target.shape)
    return loss, target != -100


def train_loop(model: nn.Module, feats, y, st: TrainSettings, grad_hook=None, step_hook=None,
               param_groups=None, optimizer: str = "adamw") -> dict[str, float]:
    params = param_groups or [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, st.lr, st.weight_decay, st.momentum, st.nesterov)
    dev = model_device(model)

    def batch_loss(idx, _gen):
        xb, yb = batch_of(feats, y, idx)
        with _autocast(st.autocast, dev):
            logits = model(**to_device(xb, dev)).logits
        loss, mask = token_losses(logits, yb.to(dev))
        return loss.sum() / mask.sum().clamp(min=1)

    return train_epochs(model, len(y), st.epochs, st.batch_size, st.seed, batch_loss, opt,
                        grad_hook, step_hook)


@torch.no_grad()
def evaluate(model: nn.Module, feats, y, batch_size: int = 16, autocast: bool = False
             ) -> dict[str, float]:
    """Held-out ``loss`` (mean cross-entropy per labelled token), ``perplexity`` = exp(loss),
    ``accuracy`` (greedy next-token hits on the labelled tokens) and ``eval_tokens``."""
    model.eval()
    dev = model_device(model)
    total, count, hits = 0.0, 0, 0
    for start in range(0, len(y), batch_size):
        xb, yb = batch_of(feats, y, torch.arange(start, min(start + batch_size, len(y))))
        with _autocast(autocast, dev):
            logits = model(**to_device(xb, dev)).logits
        yb = yb.to(dev)
        loss, mask = token_losses(logits, yb)
        total += float(loss.sum())
        count += int(mask.sum())
        hits += int(((logits[:, :-1].argmax(-1) == yb[:, 1:]) & mask).sum())
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)),
            "accuracy": hits / max(count, 1), "eval_tokens": float(count)}


@torch.no_grad()
def generate(model: nn.Module, tok, prompts: list[list[int]], max_new_tokens: int
             ) -> list[str]:
    """Greedy continuations (one prompt at a time: no padding side effects)."""
    model.eval()
    dev = model_device(model)
    out = []
    for ids in prompts:
        x = torch.as_tensor([ids], dtype=torch.long, device=dev)
        gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=int(max_new_tokens), pad_token_id=pad_id(tok),
                             use_cache=True,
                             eos_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0, len(ids):], skip_special_tokens=True))
    return out


# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def encoded_split(model_path: str, data_dir: str, split: str, fmt: str, max_length: int,
                  column: str) -> lm_data.Encoded:
    """A whole split read, checked and tokenized once per process."""
    rows, idx = lm_data.split_rows(data_dir, split)
    return lm_data.encode_rows(rows, idx, fmt, tokenizer_for(model_path), max_length, column)


class CausalLMTask(TaskBase):
    """Model + data + loops for one causal-LM run config (built once per process)."""

    kind = "causal-lm"
    num_classes = 0

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.quantize != "none":
            quantization_config(cfg.quantize)  # refuse early where it cannot run
        self.model_path = resolve_model(cfg.model)
        self.tokenizer = tokenizer_for(self.model_path)
        self.max_length = int(cfg.max_length)
        limit = max_positions(self.model_path)
        if limit is not None and self.max_length > limit:
            raise ValueError(f"run-config max-length {self.max_length} exceeds the "
                             f"{limit} positions of {self.model_path!r}")
        self.autocast = cfg.autocast_bf16
        self.column = cfg.partition_column if cfg.partitioner in ("dirichlet", "pathological",
                                                                  "natural") else ""
        if cfg.partitioner in ("dirichlet", "pathological", "natural") and not self.column:
            raise ValueError(f"partitioner {cfg.partitioner!r} for task 'causal-lm' needs "
                             "run-config partition-column (a category / user column)")
        # every row of both splits checked and tokenized now: bad data stops here
        self.train_enc = self._encoded(cfg.data_dir, "train")
        self.test_enc = self._encoded(cfg.data_dir, "test", column="")
        self.format = self.train_enc.fmt
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        self.model_cfg = CausalModelConfig(
            path=self.model_path, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
            targets=targets, seed=cfg.model_seed, quantize=cfg.quantize,
            gradient_checkpointing=cfg.gradient_checkpointing, device=str(self.device))

    def _encoded(self, data_dir: str, split: str, column: str | None = None) -> lm_data.Encoded:
        return encoded_split(self.model_path, data_dir, split, self.cfg.data_format,
                             self.max_length, self.column if column is None else column)

    # --- model -----------------------------------------------------------------------------
    def new_model(self, adapter: bool) -> nn.Module:
        return build_model(self.model_cfg, adapter)

    def base(self) -> nn.Module:
        return build_base(self.model_cfg)

    # --- data ------------------------------------------------------------------------------
    def partition(self, enc: lm_data.Encoded, partition_id: int, num_partitions: int
                  ) -> np.ndarray:
        from .data import partition_indices

        c = self.cfg
        if c.partitioner == "natural":
            return lm_data.natural_partition(enc.groups, num_partitions, partition_id, c.seed)
        labels = (lm_data.category_labels(enc.groups) if c.partitioner != "iid"
                  else np.zeros(len(enc.ids), np.int64))
        return partition_indices(labels, num_partitions, partition_id, c.partitioner,
                                 c.dirichlet_alpha, c.seed, c.classes_per_partition,
                                 c.min_partition_size)

    def client_data(self, partition_id: int, num_partitions: int, data_dir: str = ""):
        enc = self._encoded(data_dir, "train") if data_dir else self.train_enc
        idx = self.cap_client(self.partition(enc, partition_id, num_partitions), partition_id)
        ids = [enc.ids[i] for i in idx]
        labels = [enc.labels[i] for i in idx]
        if self.cfg.packing:
            ids, labels = lm_data.pack(ids, labels, self.max_length)
        return to_tensors(ids, labels, pad_id(self.tokenizer))

    def test_data(self):
        enc = self.test_enc
        idx = self.test_subset(len(enc.ids))
        idx = range(len(enc.ids)) if idx is None else idx
        return to_tensors([enc.ids[i] for i in idx], [enc.labels[i] for i in idx],
                          pad_id(self.tokenizer))

    def generation_prompts(self, n: int) -> list[list[int]]:
        """The first ``n`` held-out examples' prompts (``text`` rows: their first 16 tokens)."""
        enc = self.test_enc
        out = []
        for ids, plen in zip(enc.ids[:n], enc.prompt_len[:n]):
            plen = plen if plen > 0 else min(PROMPT_TOKENS_OF_TEXT, max(len(ids) // 2, 1))
            out.append(ids[:plen])
        return out

    # --- loops -----------------------------------------------------------------------------
    def _train(self, model, data, settings: TrainSettings, grad_hook=None, step_hook=None,
               param_groups=None, optimizer: str = "adamw") -> dict[str, float]:
        feats, y = data
        return train_loop(model, feats, y, settings, grad_hook=grad_hook, step_hook=step_hook,
                          param_groups=param_groups, optimizer=optimizer)

    def evaluate(self, model: nn.Module, data) -> dict[str, float]:
        feats, y = data
        return evaluate(model.to(self.device), feats, y, batch_size=max(self.cfg.batch_size, 1),
                        autocast=self.autocast)

    def after_evaluation(self, model: nn.Module, server_round: int, run_dir: Path) -> None:
        """``generate-prompts`` > 0: greedy continuations of the fixed held-out prompts,
        appended to ``<run>/generations.jsonl`` (one line per prompt and evaluation)."""
        n = int(self.cfg.generate_prompts)
        if n <= 0:
            return
        prompts = self.generation_prompts(n)
        outs = generate(model.to(self.device), self.tokenizer, prompts,
                        self.cfg.generate_max_new_tokens)
        with open(Path(run_dir) / "generations.jsonl", "a", encoding="utf-8") as f:
            for i, (p, o) in enumerate(zip(prompts, outs)):
                f.write(json.dumps({"round": server_round, "prompt_index": i,
                                    "prompt": self.tokenizer.decode(p, skip_special_tokens=True),
                                    "output": o}, ensure_ascii=False) + "\n")
