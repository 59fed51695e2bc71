"""Named run-config presets of ``./run`` (``python -m fedlora.launch sim --preset NAME``);
overrides given after them win. ``main`` is the main job, ``vision`` the earlier one.

``compare_main`` is the main job's closing line: its measured bytes against the references
measured on the same rounds, clients and seed (``python benchmarks/run.py main-job`` →
``results/main-job``): dense LoRA in fp32 and full fine-tuning of the encoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: LoRA (rank 4, frozen head) on the bundled MiniLM-L6 and BBC News, 10 simulated clients by
#: Dirichlet(0.5), 5 a round, 12 rounds of 128 examples; updates up and per-node delta downloads
#: down both in 1-bit signs with one scale a tensor and error feedback at both ends (a node's
#: first download: 4-bit weights)
MAIN: dict[str, Any] = {
    "task": "text", "model": "minilm", "dataset": "bbc-news", "method": "fl-lora",
    "lora-rank": 4, "train-head": False, "lr": 2e-3, "num-server-rounds": 12,
    "fraction-train": 0.5, "min-train-nodes": 5, "min-available-nodes": 10,
    "local-epochs": 1, "batch-size": 16, "max-length": 48, "max-examples-per-client": 128,
    "partitioner": "dirichlet", "dirichlet-alpha": 0.5, "eval-every": 4,
    "eval-max-examples": 0, "seed": 42, "upload": "delta", "download": "delta",
    "codec-up": "sign:tensor|zstd", "codec-down": "sign:tensor|zstd",
    "codec-down-full": "affine:4|zstd", "error-feedback": True,
}

#: the earlier main job: FedAvg of ResNet-8 (width 16) on Fashion-MNIST, 4-bit updates up and
#: 4-bit delta downloads, 25 rounds of 2 local epochs
VISION: dict[str, Any] = {
    "method": "fedavg", "feature-maps": 16, "augment": False, "local-epochs": 2, "lr": 0.05,
    "lr-schedule": "cosine", "num-server-rounds": 25, "max-examples-per-client": 1000,
    "upload": "delta", "download": "delta", "codec-up": "affine:4|zstd",
    "codec-down": "affine:4|zstd", "eval-every": 5,
}

#: FlowerTune LLM's general-NLP challenge as fedlora runs it (docs/causal-lm.md): a local
#: causal-LM folder and alpaca-layout data (e.g. alpaca-gpt4) that the user gives, 20 clients,
#: 10 % a round, LoRA r=32 alpha=64 on q_proj and v_proj (peft's default for Llama / Mistral /
#: Qwen2, which FlowerTune's template gets), 200 rounds of 10 local steps of 16
#: examples at max-length 512, cosine lr from 5e-5, a 4-bit (NF4) base, bf16 autocast and
#: gradient checkpointing on a CUDA GPU. ``--nodes 20 --gpus-per-node 0.2`` puts five virtual
#: clients on one GPU.
FLOWERTUNE_NLP: dict[str, Any] = {
    "task": "causal-lm", "model": "", "data-dir": "", "dataset": "flowertune-general-nlp",
    "data-format": "alpaca", "method": "fl-lora", "lora-rank": 32, "lora-alpha": 64.0,
    "lora-targets": "q_proj,v_proj",
    "lr": 5e-5, "lr-schedule": "cosine", "weight-decay": 0.0, "num-server-rounds": 200,
    "fraction-train": 0.1, "min-train-nodes": 2, "min-available-nodes": 20, "partitioner": "iid",
    "local-epochs": 1, "batch-size": 16, "max-examples-per-client": 160, "max-length": 512,
    "quantize": "4bit", "autocast-bf16": True, "gradient-checkpointing": True,
    "device": "cuda", "eval-every": 20, "eval-max-examples": 500, "generate-prompts": 4,
    "generate-max-new-tokens": 64, "seed": 42,
}

PRESETS = {"main": MAIN, "vision": VISION, "flowertune-nlp": FLOWERTUNE_NLP}

#: keys a preset leaves for the user (``launch.prepare`` refuses the preset without them)
REQUIRED = {"flowertune-nlp": {
    "model": "a local Hugging Face causal-LM folder, e.g. model=\"/models/Qwen2.5-0.5B\"",
    "data-dir": "a folder with train.jsonl in the alpaca layout (instruction, input, output), "
                "e.g. data-dir=\"/data/alpaca-gpt4\""}}


def missing_keys(name: str, rc: dict[str, Any]) -> str:
    """'' when preset ``name`` has what it needs in ``rc``, else one line saying what is
    missing."""
    need = [f"{k} ({why})" for k, why in REQUIRED.get(name, {}).items() if not rc.get(k)]
    return f"preset {name!r} needs " + "; ".join(need) if need else ""

def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def compare_main(run_dir: Path, refs: Path) -> str:
    """One line: this run's total MB and final accuracy beside the committed references'
    (``refs/runs/lora-dense-fp32`` and ``refs/runs/full-ft-fp32``), or why there is no
    comparison (a config other than :data:`MAIN`, references not committed)."""
    ours = _read(run_dir / "summary.json")
    if "total_mb" not in ours:
        return f"[fedlora] no summary in {run_dir}: nothing to compare"
    cfg = _read(run_dir / "run.json").get("config", {})
    if any(cfg.get(k) != v for k, v in MAIN.items()):
        return ("[fedlora] no measured reference for this configuration (an override changed "
                "the main job); results/main-job holds the references of the preset")
    parts = []
    for name, label in (("lora-dense-fp32", "dense fp32 LoRA"),
                        ("full-ft-fp32", "full fine-tuning (FedAvg, fp32)")):
        ref = _read(refs / "runs" / name / "summary.json")
        if "total_mb" not in ref:
            parts.append(f"{label}: not committed in {refs / 'runs' / name}")
            continue
        parts.append(f"{label} {ref['total_mb']:.1f} MB = {ref['total_mb'] / ours['total_mb']:.0f}x "
                     f"more (acc {ref.get('final_accuracy', float('nan')):.4f})")
    acc = ours.get("final_accuracy")
    return (f"[fedlora] this run {ours['total_mb']:.2f} MB, acc "
            f"{acc if acc is None else format(acc, '.4f')} | measured, same rounds, clients and "
            f"seed (results/main-job): " + " | ".join(parts))
