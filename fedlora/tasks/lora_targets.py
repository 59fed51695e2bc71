"""Where LoRA goes in any Hugging Face transformer (encoder or causal LM), found by inspecting the
model rather than by a table of names.

The *blocks* are the ``nn.ModuleList`` of numbered layers holding the most linear projections
(``bert.encoder.layer``, ``model.layers``, ``transformer.h``, ``gpt_neox.layers``…); the automatic
targets are every ``nn.Linear`` / transformers ``Conv1D`` inside a block (Conv1D: peft is told
``fan_in_fan_out``), named by their path inside the block — :data:`FAMILY_TARGETS` lists what
that gives per family (the tests compare against it). Run-config ``lora-targets`` overrides
them for any architecture: an entry equal to a path inside the block matches that path only,
any other entry every path ending in ``.<entry>``; an entry that matches nothing is an error
listing the block's projections. Per-family table: docs/causal-lm.md ("Model and LoRA targets").
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

#: the per-family lists the automatic rule yields (documentation and a test's cross-check)
FAMILY_TARGETS = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "gpt_neox": ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                 "mlp.dense_4h_to_h"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"),
    "distilbert": ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                   "ffn.lin1", "ffn.lin2"),
}


def is_projection(mod: nn.Module) -> bool:
    """A module LoRA can adapt: ``nn.Linear`` (bitsandbytes' 4/8-bit layers subclass it) or
    transformers' ``Conv1D``."""
    if isinstance(mod, nn.Linear):
        return True
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the model's repeated blocks: the ModuleList of numbered children
    holding the most projections (the outermost one when lists nest, as MoE experts do)."""
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        count = sum(1 for m in mod.modules() if is_projection(m))
        if count == 0:
            continue
        key = (count, -len(name))
        if best is None or key > best[:2]:
            best = (count, -len(name), name, mod)
    if best is None:
        raise ValueError(f"cannot find the repeated blocks of {type(model).__name__} (no "
                         "ModuleList of layers holding Linear/Conv1D projections); LoRA needs a "
                         "transformer with numbered layers")
    return best[2], best[3]


def block_projections(model: nn.Module) -> "OrderedDict[str, int]":
    """Path inside a block → how many blocks hold a projection there (first block's order)."""
    _, blocks = find_blocks(model)
    out: "OrderedDict[str, int]" = OrderedDict()
    for block in blocks:
        for rel, mod in block.named_modules():
            if rel and is_projection(mod):
                out[rel] = out.get(rel, 0) + 1
    return out


def detect_targets(model: nn.Module) -> tuple[str, ...]:
    """The automatic targets: every projection path inside the blocks."""
    return tuple(block_projections(model))


def entry_matches(entry: str, rel: str, exact: bool) -> bool:
    return rel == entry if exact else rel.endswith("." + entry) or rel == entry


def match_modules(model: nn.Module, targets: tuple[str, ...] = ()) -> list[str]:
    """Full names of the modules to adapt (``targets``: lora-targets entries; empty = all
    projections of every block). ValueError naming an entry that matches nothing."""
    prefix, blocks = find_blocks(model)
    paths = block_projections(model)
    targets = tuple(t.strip() for t in targets if t.strip()) or tuple(paths)
    exact = {t: t in paths for t in targets}
    for t in targets:
        if not any(entry_matches(t, rel, exact[t]) for rel in paths):
            raise ValueError(f"lora-targets entry {t!r} matches no Linear/Conv1D inside the "
                             f"blocks of {type(model).__name__} ({prefix}.<i>.…); the projections "
                             f"there are: {', '.join(paths)}")
    names = []
    for i, block in enumerate(blocks):
        for rel, mod in block.named_modules():
            if rel and is_projection(mod) and any(entry_matches(t, rel, exact[t])
                                                  for t in targets):
                names.append(f"{prefix}.{i}.{rel}" if prefix else f"{i}.{rel}")
    return names


def uses_conv1d(model: nn.Module, names: list[str]) -> bool:
    mods = dict(model.named_modules())
    return any(type(mods[n]).__name__ == "Conv1D" for n in names)


def wrap(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = (),
         modules_to_save: list[str] | None = None, seed: int = 0, dropout: float = 0.0
         ) -> nn.Module:
    """peft LoRA on exactly the matched modules (see :func:`match_modules`), seeded: every node
    builds the same A factors. Checks the count peft wrapped."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    names = match_modules(model, targets)
    lcfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                      bias="none", target_modules=names, modules_to_save=modules_to_save,
                      fan_in_fan_out=uses_conv1d(model, names))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # peft ↔ transformers 5 naming
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        torch.manual_seed(int(seed) + 1)
        peft_model = get_peft_model(model, lcfg)
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    if len(wrapped) != len(names):
        raise RuntimeError(f"peft wrapped {len(wrapped)} modules, expected {len(names)}")
    return peft_model
