"""Named benchmark suites: each configuration is a run-config override set for one real Flower
simulation (the same code path as ``flwr run .``)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = str(ROOT / "tests" / "data" / "fashion-mnist-sample")
SHARED = ROOT.parent / "shared" / "data"


def _vision_cpu() -> dict:
    base = {"dataset": "fashion-mnist", "model": "resnet8", "feature-maps": 16,
            "partitioner": "dirichlet", "dirichlet-alpha": 0.5, "num-server-rounds": 20,
            "fraction-train": 0.25, "min-train-nodes": 2, "local-epochs": 1,
            "max-examples-per-client": 500, "seed": 42}
    runs = {"fedavg": {**base, "method": "fedavg"}}
    for r in (16, 32):
        for spec in ("fp32", "affine:8", "affine:4", "affine:2"):
            runs[f"flocora-r{r}-{spec.replace(':', '')}"] = {
                **base, "method": "flocora", "lora-rank": r, "codec-up": spec}
    for d in (0.25, 0.0625):
        runs[f"flasc-d{d}"] = {**base, "method": "flasc", "lora-rank": 16, "density-down": d,
                               "density-up": d, "server-opt": "adamw", "server-lr": 0.01}
    for ef in (False, True):
        runs[f"flocora-r16-topk0.1-affine4{'-ef' if ef else ''}"] = {
            **base, "method": "flocora", "lora-rank": 16, "codec-up": "topk:0.1|affine:4",
            "error-feedback": ef}
    return {"nodes": 20, "runs": runs, "target": 0.6}


def _text_cpu() -> dict:
    """MiniLM-L6 on the bundled BBC News corpus (offline for anyone; 5 classes), 6 clients,
    full participation: LoRA-A2 (r_G = 16, budget r_i) against FL+LoRA / FFA-LoRA / FlexLoRA at
    rank r_i, under Dir(0.01) and Dir(0.5). Sized for a 2-core CPU (minutes per run)."""
    base = {"task": "text", "model": "minilm", "dataset": "bbc-news", "lr": 5e-4,
            "num-server-rounds": 4, "fraction-train": 1.0, "min-train-nodes": 6,
            "min-available-nodes": 6, "local-epochs": 1, "batch-size": 16, "max-length": 48,
            "max-examples-per-client": 64, "partitioner": "dirichlet", "seed": 42}
    runs = {}
    for alpha in (0.01, 0.5):
        for budget in (1, 4):
            tag = f"a{alpha}-r{budget}"
            runs[f"lora-a2-{tag}"] = {**base, "method": "lora-a2", "dirichlet-alpha": alpha,
                                      "lora-rank": 16, "rank-budget": budget}
            for m in ("fl-lora", "ffa-lora", "flexlora"):
                runs[f"{m}-{tag}"] = {**base, "method": m, "dirichlet-alpha": alpha,
                                      "lora-rank": budget, "rank-budget": budget}
        runs[f"lora-a2-a{alpha}-r1-affine8"] = {**base, "method": "lora-a2",
                                                "dirichlet-alpha": alpha, "lora-rank": 16,
                                                "rank-budget": 1, "codec-up": "affine:8"}
    return {"nodes": 6, "runs": runs, "target": 0.5}


def _text_cpu_e5() -> dict:
    """The low-rank, extreme-heterogeneity corner of text-cpu with the paper's 5 local epochs."""
    spec = _text_cpu()
    keep = ("lora-a2-a0.01-r1", "fl-lora-a0.01-r1", "ffa-lora-a0.01-r1")
    runs = {k: {**spec["runs"][k], "local-epochs": 5, "num-server-rounds": 5} for k in keep}
    return {**spec, "runs": runs}


SUITES = {
    # CI-sized: proves the pipeline in minutes
    "vision-quick": lambda: {"nodes": 2, "target": 0.2, "runs": {
        name: {"dataset": "npz", "data-dir": SAMPLE, "feature-maps": 8, "lora-rank": 4,
               "num-server-rounds": 2, "max-examples-per-client": 64, "partitioner": "iid",
               "fraction-train": 1.0, **extra}
        for name, extra in {"fedavg": {"method": "fedavg"},
                            "flocora-fp32": {"method": "flocora"},
                            "flocora-affine4": {"method": "flocora", "codec-up": "affine:4"}}.items()}},
    "vision-cpu": _vision_cpu,
    "text-cpu": _text_cpu,
    "text-cpu-e5": _text_cpu_e5,
    # the papers' settings, for a GPU machine (documented, not run in CI)
    "paper-flocora": lambda: {"nodes": 100, "target": 0.7, "runs": {
        f"flocora-r32-{spec.replace(':', '')}": {
            "dataset": "cifar10", "data-dir": str(SHARED / "cifar10"), "model": "resnet8",
            "feature-maps": 64, "lora-rank": 32, "num-server-rounds": 100,
            "fraction-train": 0.1, "min-train-nodes": 10, "local-epochs": 5,
            "max-examples-per-client": 0, "dirichlet-alpha": 0.5, "method": "flocora",
            "codec-up": spec} for spec in ("fp32", "affine:8", "affine:4", "affine:2")}
        | {"fedavg": {"dataset": "cifar10", "data-dir": str(SHARED / "cifar10"),
                      "model": "resnet8", "feature-maps": 64, "num-server-rounds": 100,
                      "fraction-train": 0.1, "min-train-nodes": 10, "local-epochs": 5,
                      "max-examples-per-client": 0, "dirichlet-alpha": 0.5,
                      "method": "fedavg"}}},
    "paper-lora-a2": lambda: {"nodes": 30, "target": 0.6, "runs": {
        f"{m}-r{r}": {"task": "text", "model": "roberta-base", "dataset": "banking77",
                      "data-dir": str(SHARED / "banking77"), "lora-rank": 16 if m == "lora-a2" else r,
                      "rank-budget": r, "lr": 5e-4, "num-server-rounds": 50,
                      "fraction-train": 1.0, "min-train-nodes": 30, "local-epochs": 5,
                      "max-examples-per-client": 0, "dirichlet-alpha": 0.01, "method": m}
        for m in ("lora-a2", "fl-lora", "ffa-lora", "flexlora") for r in (1, 2, 4, 8)}},
}
