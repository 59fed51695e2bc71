"""Bytes of FlowerTune's general-NLP challenge schedule as fedlora would send them (issue 35,
item 5), without a GPU: the adapter message of a 7B causal LM measured on fedlora's wire.

The model is built from its transformers config on the ``meta`` device (shapes only, no weights,
no download): ``MistralConfig()`` and ``LlamaConfig()`` defaults, which transformers documents as
Mistral-7B-v0.1's and Llama-2-7B's dimensions. LoRA r=32 on (a) peft's default targets for the
family (``q_proj``, ``v_proj``: what FlowerTune's template gets, its ``LoraConfig`` names none)
and (b) every projection of every block (fedlora's automatic targets). One message = an update
of N(0, 1e-3²) values (seed 0; codec key 1 for the rotated codec) encoded by each codec chain into one Flower message, counted by
:func:`fedlora.wire.message_bytes` (the object tree Flower serializes). A run = 200 rounds x 2
clients (10 % of 20) x one download and one upload each; control messages (a few kB a round) are
left out. Accuracy is not measured here: that needs the GPU run of the ``flowertune-nlp`` preset.

    python benchmarks/flowertune_bytes.py --out results/flowertune-bytes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROUNDS, CLIENTS_PER_ROUND, RANK = 200, 2, 32
SPECS = ("fp32", "bf16", "affine:8|zstd", "affine:4|zstd", "sign:tensor|zstd",
         "eden:0.5:mse:tensor")


def lora_shapes(family: str, targets: str) -> dict[str, tuple[int, ...]]:
    """{peft state name: shape} of LoRA rank :data:`RANK` on ``family``'s 7B config, for
    ``targets`` = ``peft-default`` or ``all``."""
    import torch
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    from fedlora.tasks.lora_targets import match_modules

    cfg = {"mistral": MistralConfig, "llama": LlamaConfig}[family]()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    names = match_modules(model, tuple(PEFT[family]) if targets == "peft-default" else ())
    mods = dict(model.named_modules())
    shapes = {}
    for n in names:
        m = mods[n]
        shapes[f"base_model.model.{n}.lora_A.weight"] = (RANK, m.in_features)
        shapes[f"base_model.model.{n}.lora_B.weight"] = (m.out_features, RANK)
    return shapes


def message_size(update: dict, spec: str) -> int:
    from flwr.app import Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.compression import parse_spec
    from fedlora.strategies.base import ADAPTER_KEY
    from fedlora.wire import encode_record, message_bytes

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # Message() outside an app
    msg = Message(RecordDict({ADAPTER_KEY: encode_record(update, parse_spec(spec).keyed(1), True)}),
                  message_type=MessageType.TRAIN, dst_node_id=1)
    return message_bytes(msg)


def measure() -> list[dict]:
    import numpy as np

    rows = []
    for family in ("mistral", "llama"):
        for targets in ("peft-default", "all"):
            shapes = lora_shapes(family, targets)
            rng = np.random.default_rng(0)
            update = {k: (1e-3 * rng.standard_normal(s, dtype=np.float32)) for k, s in
                      shapes.items()}
            params = sum(int(np.prod(s)) for s in shapes.values())
            for spec in SPECS:
                t = time.perf_counter()
                size = message_size(update, spec)
                rows.append({"family": family, "targets": targets, "params": params,
                             "codec": spec, "message_bytes": size,
                             "run_gb": size * ROUNDS * CLIENTS_PER_ROUND * 2 / 1e9,
                             "encode_s": round(time.perf_counter() - t, 2)})
                print(json.dumps(rows[-1]), flush=True)
            del update
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model (transformers config) | LoRA r=32 targets | params | codec | "
             "message MB | 200-round run GB |", "|---|---|---|---|---|---|"]
    for r in rows:
        model = {"mistral": "Mistral-7B (`MistralConfig()`)",
                 "llama": "Llama-2-7B (`LlamaConfig()`)"}[r["family"]]
        tg = "q_proj, v_proj (peft default)" if r["targets"] == "peft-default" else "all 7"
        codec = r["codec"].replace("|", chr(92) + "|")
        lines.append(f"| {model} | {tg} | {r['params']:,} | `{codec}` "
                     f"| {r['message_bytes'] / 1e6:.2f} | {r['run_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    rows = measure()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bytes.json").write_text(json.dumps(
        {"command": "python benchmarks/flowertune_bytes.py --out " + str(a.out),
         "rounds": ROUNDS, "clients_per_round": CLIENTS_PER_ROUND, "rank": RANK,
         "rows": rows}, indent=2))
    (a.out / "bytes.md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
