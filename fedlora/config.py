"""Run configuration: enters once (Flower run config + node config), passed down as plain values.

The defaults here are the defaults of ``[tool.flwr.app.config]`` in ``pyproject.toml``; a test
keeps the two identical.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping


def _key(name: str) -> str:
    return name.replace("_", "-")


def _f(default: Any, help: str) -> Any:
    """A RunConfig field: its default and its help (one or two sentences; docs/configuration.md
    is generated from it by ``python -m fedlora.configdoc``)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunConfig:
    # --- federation and method ---
    method: str = _f("flocora", "The federated method, one of `fedavg`, `flocora`, `flasc`, "
                     "`lora-a2`, `fl-lora`, `ffa-lora`, `flexlora`, `hetlora` (docs/methods.md).")
    num_server_rounds: int = _f(5, "Federated rounds.")
    fraction_train: float = _f(0.5, "Fraction of the connected nodes sampled per round.")
    min_train_nodes: int = _f(2, "At least this many nodes are sampled per round.")
    min_available_nodes: int = _f(2, "A round waits until this many nodes are connected.")
    round_timeout: float = _f(3600.0, "Seconds the server waits for a round's replies (and for "
                              "query answers).")
    client_sampling: str = _f("partition", "`partition`: sample partition-ids with a generator "
                              "seeded by (`seed`, round), so same seed = same clients (one `query` "
                              "a node, counted as control bytes; suits up to ~1,000 nodes); "
                              "`flower`: Flower's random sampling of node ids, no query.")
    seed: int = _f(42, "Seed of partitioning, node sampling and local shuffling/augmentation.")
    # --- model ---
    task: str = _f("vision", "What is learned: `vision` (image classification), `text` "
                   "(sequence classification with a pretrained encoder) or `causal-lm` "
                   "(instruction / chat / text fine-tuning of a causal LM, docs/causal-lm.md).")
    model: str = _f("resnet8", "vision: `resnet8` or `resnet18` (CIFAR-style, FLoCoRA's); text: "
                    "`minilm` (bundled, offline), a local Hugging Face folder, or a hub id when "
                    "online; causal-lm: a local Hugging Face causal-LM folder.")
    feature_maps: int = _f(64, "vision: base width of the ResNet (paper: 64; 8-16 for quick runs).")
    norm: str = _f("group", "vision: `group` (GroupNorm, 2 groups) or `batch` (BatchNorm).")
    lora_rank: int = _f(32, "LoRA rank r: on every Conv2d (vision; norms and fc train in full) or "
                        "on the `lora-targets` linear modules (text).")
    lora_alpha: float = _f(0.0, "LoRA alpha; 0 = the default: 16·r for vision (FLoCoRA's "
                           "alpha/r = 16), 16 for text.")
    model_seed: int = _f(0, "Seed of the frozen random vision base / the text classifier head "
                         "(never sent; its fingerprint is checked).")
    # --- text task ---
    max_length: int = _f(64, "text: token length (batches are trimmed to their longest row).")
    train_head: bool = _f(False, "text: train the classifier head (then it travels); the paper "
                          "keeps it frozen.")
    lora_targets: str = _f("", "text, causal-lm: comma list of modules inside one block, by "
                           "path (`attention.output.dense`) or name (`q_proj`, `c_attn`); empty "
                           "= every Linear/Conv1D of every block (BERT: the paper's 6 types; "
                           "Llama: q/k/v/o/gate/up/down_proj; GPT-2: c_attn, c_proj, c_fc).")
    autocast_bf16: bool = _f(False, "text, causal-lm: bfloat16 autocast on the training device "
                             "(CPU: ~1.7x faster on CPUs with AVX512-BF16, slightly different "
                             "numbers).")
    # --- causal-lm task ---
    data_format: str = _f("auto", "causal-lm: layout of the data files: `alpaca` (instruction, "
                          "input, output), `chat` (messages), `text`, or `auto` (by the columns).")
    partition_column: str = _f("", "causal-lm: the column `partitioner=dirichlet` draws its "
                               "classes from, or `natural` gives each value (a user, an "
                               "author) whole to one partition.")
    packing: bool = _f(False, "causal-lm: concatenate a client's examples and cut them into "
                       "`max-length` chunks.")
    gradient_checkpointing: bool = _f(False, "causal-lm: recompute activations in the backward "
                                      "pass (less memory, ~30% slower).")
    quantize: str = _f("none", "causal-lm: `4bit` (NF4, QLoRA) or `8bit` base through "
                       "bitsandbytes (CUDA only; extra `qlora`), or `none`.")
    generate_prompts: int = _f(0, "causal-lm: at every evaluation, greedy continuations of the "
                               "first N held-out prompts go to `<run>/generations.jsonl`.")
    generate_max_new_tokens: int = _f(32, "causal-lm: tokens generated per prompt.")
    # --- data ---
    dataset: str = _f("fashion-mnist", "vision: `fashion-mnist`, `cifar10` or any image set in "
                      "`data-dir` (e.g. `npz`); text: `bbc-news` (bundled, offline), `banking77`, "
                      "`20newsgroups` (docs/running.md).")
    data_dir: str = _f("", "Folder with the data; empty = `/usr/share/datasets/fashion-mnist` for "
                       "`fashion-mnist`, the bundled copy of `bbc-news`, else the hub when "
                       "online. A node's `--node-config data-dir=...` overrides it.")
    partitioner: str = _f("dirichlet", "`dirichlet`, `iid` or `pathological` (flwr-datasets "
                          "partitioners; computed once per machine, cached in "
                          "`~/.cache/fedlora/partitions/`); causal-lm also `natural` (by "
                          "`partition-column`).")
    dirichlet_alpha: float = _f(0.5, "Dirichlet concentration of `partitioner=dirichlet`.")
    classes_per_partition: int = _f(2, "Classes per partition of `partitioner=pathological`.")
    min_partition_size: int = _f(1, "Every partition holds at least this many training "
                                 "examples: a Dirichlet draw that leaves one smaller is redrawn "
                                 "(flwr-datasets, up to 10 draws, then a clear error); 0 allows "
                                 "empty clients (their replies are dropped every round).")
    max_examples_per_client: int = _f(1000, "Cap on a client's local examples per round (0 = its "
                                      "whole partition); also caps a reply's claimed weight.")
    eval_max_examples: int = _f(0, "Central evaluation on a fixed random subset of N test "
                                "examples (seed 0, the same in every run); 0 = the full test set.")
    eval_every: int = _f(1, "Central evaluation before round 1, every N rounds and after the "
                         "last; other rounds' records have no accuracy.")
    # --- local training ---
    local_epochs: int = _f(1, "Local epochs per round (paper: 5).")
    batch_size: int = _f(32, "Local batch size.")
    lr: float = _f(0.01, "Local learning rate (vision: SGD; text: AdamW).")
    lr_schedule: str = _f("constant", "`constant`, or `cosine`: round t trains at "
                          "`lr`·½(1 + cos(π(t−1)/T)), T = `num-server-rounds`.")
    momentum: float = _f(0.9, "SGD momentum (vision).")
    nesterov: bool = _f(True, "Nesterov momentum (vision SGD).")
    weight_decay: float = _f(0.0, "Local weight decay.")
    augment: bool = _f(True, "vision: random crop (pad 4) + horizontal flip of training batches.")
    client_threads: int = _f(1, "Torch threads per ClientApp (several nodes share a host).")
    device: str = _f("auto", "Where local training and evaluation run: `auto` (CUDA if torch sees "
                     "a GPU, else CPU), `cpu`, `cuda`, `cuda:N`; models are built on CPU, so the "
                     "base is the same everywhere.")
    # --- communication ---
    codec_down: str = _f("fp32", "Codec chain of the download, e.g. `fp16`, `affine:8`, "
                         "`topk:0.1|affine:4|zstd` (docs/codecs.md).")
    codec_up: str = _f("fp32", "Codec chain of the upload (docs/codecs.md).")
    error_feedback: bool = _f(False, "Clients keep the residual of what `codec-up` dropped and add "
                              "it to the next upload.")
    upload: str = _f("weights", "`weights`, or `delta`: fedavg/flocora/fl-lora/ffa-lora send their "
                     "update (trained − received) instead; FLASC and LoRA-A2 always send updates.")
    download: str = _f("full", "`full`: every node gets the global through `codec-down`; `delta`: "
                       "only `codec-down`(global − the node's copy), with server-side error "
                       "feedback (docs/downloads.md).")
    codec_down_full: str = _f("", "`download=delta`: the codec of a full download (a node the "
                              "server holds no copy of); empty = `codec-down` without its "
                              "sparsifier.")
    download_init: bool = _f(False, "`download=delta`: a node without a copy gets `codec-down`"
                             "(global − initial adapter), not a full download; every node "
                             "builds the initial adapter from `model-seed` (docs/downloads.md).")
    payload_table: str = _f("digest", "How a payload names its tensors: `digest` (8 bytes, payload "
                            "format 2) or `names` (the table spelled out, format 1, ~25 bytes a "
                            "tensor).")
    delta_max_nodes: int = _f(10000, "`download=delta`: node copies the server keeps (least "
                              "recently served evicted first; an evicted node gets a full "
                              "download).")
    # --- robustness ---
    max_weight_ratio: float = _f(3.0, "A reply's `num-examples` counts at most this × the round's "
                                 "median reported count (0: no cap) (docs/hostile-nodes.md).")
    equal_weights: bool = _f(False, "Average replies with equal weights, ignoring `num-examples`.")
    update_norm_bound: float = _f(0.0, "L2 bound on each update; 0 = automatic: "
                                  "`norm-bound-factor` × the round's median update norm (rounds "
                                  "with ≥ 3 replies), or in rounds of 1–2 replies the trusted "
                                  "bound of `norm-bound-history` (docs/hostile-nodes.md).")
    norm_bound_factor: float = _f(5.0, "The automatic bound's multiple of the median update norm "
                                  "(0: no automatic bound).")
    norm_bound_history: int = _f(5, "Rounds of 1–2 replies: bound = `norm-bound-factor` × the "
                                 "largest median norm of the last this many applied rounds of ≥ 2 "
                                 "replies and of the round's own smaller norm (none: "
                                 "`norm-bound-global`); 0: no bound below 3 replies.")
    norm_bound_global: float = _f(1.0, "A round of one reply with no trusted history (round 1): "
                                  "the bound is this × the L2 norm of the global model's "
                                  "travelling tensors (0: none).")
    norm_bound_action: str = _f("clip", "An update over the bound is scaled down to it (`clip`) "
                                "or dropped (`reject`).")
    aggregation: str = _f("mean", "`mean`, or the coordinate-wise `median` / `trimmed-mean` of the "
                          "uploads (unweighted; fedavg, flocora, fl-lora, ffa-lora only).")
    trim_fraction: float = _f(0.2, "`trimmed-mean`: fraction of values cut at each end per "
                              "coordinate (⌊fraction·n⌋).")
    stream_aggregation: bool = _f(True, "fedavg, flocora, fl-lora, ffa-lora, FLASC with "
                                  "`aggregation=mean` and no central DP: add each reply to a "
                                  "running sum, then free it (server memory: the sum plus one "
                                  "reply); `false`: decode every reply first.")
    # --- differential privacy ---
    dp: str = _f("off", "Client-level DP of updates: `off`, `central` (nodes clip, the server "
                 "noises the sum) or `local` (nodes clip and noise) (docs/privacy.md).")
    dp_mechanism: str = _f("gaussian", "`gaussian`, or `laplace` (local DP only: L1 clipping, "
                           "Laplace noise, as LoRA-A2/APPFL).")
    dp_clip: float = _f(1.0, "Clip norm C of each client's update (L2; L1 for `laplace`); the "
                        "initial C with `dp-adaptive-clip`.")
    dp_noise_multiplier: float = _f(1.0, "z: central noise std z·C on the sum; local noise z·2C "
                                    "per client. Ignored when `dp-target-epsilon` > 0.")
    dp_target_epsilon: float = _f(0.0, "> 0: calibrate z so that `num-server-rounds` rounds reach "
                                  "this ε at `dp-delta` (refuses to start if it cannot); 0 = use "
                                  "`dp-noise-multiplier`.")
    dp_delta: float = _f(1e-5, "δ of the reported (ε, δ); keep it well below 1/number of clients.")
    dp_adaptive_clip: bool = _f(False, "Central DP: C follows the `dp-target-quantile` of the "
                                "update norms (Andrew et al. 2019); the noisy count takes part of "
                                "the budget.")
    dp_target_quantile: float = _f(0.5, "Adaptive clipping: fraction of updates that should fit "
                                   "under C.")
    dp_clip_lr: float = _f(0.2, "Adaptive clipping: geometric step η, C ← C·exp(−η(b̃ − γ)).")
    dp_count_stddev: float = _f(0.0, "Adaptive clipping: noise std σ_b of the clipped count; 0 = "
                                "sampled nodes / 20; needs z < 2σ_b.")
    # --- secure aggregation (docs/secure-aggregation.md) ---
    secure_aggregation: bool = _f(False, "SecAgg+: the server learns only the sum of the nodes' "
                                  "quantized updates (fedavg, flocora, fl-lora, ffa-lora with "
                                  "`upload=delta`, lora-a2, flasc; nodes clip to a fixed "
                                  "`update-norm-bound`; weights capped at "
                                  "`max-examples-per-client`).")
    secagg_bits: int = _f(16, "Secure aggregation: quantization bits of a coordinate (scale "
                          "(2^(bits−1)−1)/`update-norm-bound`); on the wire bits + ⌈log2 n⌉ + 1.")
    secagg_neighbours: int = _f(0, "Secure aggregation: neighbours of each node (even); 0 = "
                                "2⌈log2 n⌉+2, or every other node when that is ≥ n−1.")
    secagg_threshold: float = _f(0.5, "Secure aggregation: t = ⌊this·(neighbours+1)⌋+1 shares "
                                 "rebuild a node's secrets; a round survives dropouts while every "
                                 "node keeps t live holders.")
    secagg_density: float = _f(1.0, "Secure aggregation: fraction of the coordinates sent each "
                               "round, one random set for all nodes drawn from (seed, round).")
    secagg_noise: float = _f(0.0, "Secure aggregation: distributed DP noise multiplier z; each "
                             "node adds Skellam noise so the sum carries std z·C (C = "
                             "`update-norm-bound`), accounted at `dp-delta`; 0 = off.")
    secagg_rank_union: bool = _f(False, "Secure aggregation, lora-a2: mask only the union of the "
                                 "nodes' selected rank slices, learned from a first secure sum "
                                 "of 0/1 slice indicators (two more exchanges a round).")
    # --- FLASC ---
    density_down: float = _f(1.0, "FLASC: fraction of the global trainable weights sent down "
                             "(top-k by magnitude).")
    density_up: float = _f(1.0, "FLASC: fraction of each client's update sent up (top-k by "
                           "magnitude).")
    density_decay: float = _f(1.0, "FLASC: both densities × this every `density-decay-rounds` "
                              "rounds.")
    density_decay_rounds: int = _f(10, "FLASC: period of the density decay.")
    server_opt: str = _f("adamw", "FLASC server optimizer: `adamw`, `sgd` or `avg` (plain mean of "
                         "the deltas).")
    server_lr: float = _f(0.001, "FLASC server learning rate.")
    server_weight_decay: float = _f(0.01, "FLASC server AdamW weight decay (the reference's torch "
                                    "default).")
    flasc_freeze: str = _f("none", "FLASC pruning baselines: `none`, `client` (clients train only "
                           "what they received) or `server` (mask fixed after one dense round).")
    # --- LoRA-A2 / rank-heterogeneous baselines ---
    rank_budget: int = _f(1, "LoRA-A2: per-client rank budget r_i (r_i·N ranks over the N "
                          "modules); FlexLoRA/HetLoRA: the client rank.")
    lr_b_ratio: float = _f(5.0, "LoRA-A2: B's learning rate = this × `lr`.")
    score_epochs: int = _f(1, "LoRA-A2: epochs of the rank-scoring pass.")
    hetlora_gamma: float = _f(0.99, "HetLoRA: rank self-pruning decay γ.")
    # --- asynchronous buffered aggregation (docs/async.md) ---
    aggregation_mode: str = _f("sync", "`sync`: rounds (every sampled node's reply, then one "
                               "step); `async`: FedBuff — `concurrency` nodes train at once and "
                               "every `buffer-size` replies step the global (fedavg, flocora, "
                               "fl-lora, ffa-lora with `upload=delta`; docs/async.md).")
    buffer_size: int = _f(4, "async: accepted replies per step of the global model (K); "
                          "`num-server-rounds` counts these steps.")
    concurrency: int = _f(0, "async: nodes kept training at once; 0 = every connected node.")
    staleness_limit: int = _f(4, "async: a reply trained on a global more than this many steps "
                              "old is dropped with its reason.")
    staleness_weight: str = _f("sqrt", "async: each update's scale in the step: `sqrt` "
                               "(1/√(1+s), FedBuff) or `constant` (1).")
    async_order: str = _f("arrival", "async: process replies as they arrive (`arrival`), or in "
                          "the order of their simulated completion time (`simulated`: each task "
                          "costs 1, a straggler's `straggler-slowdown`; same seed, same records).")
    straggler_fraction: float = _f(0.0, "Simulated heterogeneity: this fraction of the "
                                   "partitions (chosen by `seed`) are stragglers (sync and "
                                   "async).")
    straggler_slowdown: float = _f(1.0, "A straggler's local training takes this many times its "
                                   "measured time (it sleeps the difference).")
    straggler_sleep: bool = _f(True, "`false`: stragglers do not sleep; time is the simulated "
                               "clock only (`simulated_time` in the records: a normal node's "
                               "task = 1; async needs `async-order=simulated`; docs/async.md).")
    simulated_round_timeout: float = _f(0.0, "sync: a node whose simulated task cost (1, a "
                                        "straggler's `straggler-slowdown`) exceeds this is timed "
                                        "out: its reply dropped (`simulated timeout`); 0 = off.")
    # --- per-client tiers (comma lists; empty = off) ---
    tier_map: str = _f("", "Simulation: tier of each `partition-id` (comma list, cycled); deployed "
                       "nodes set `--node-config tier=N` (docs/methods.md, tiers).")
    tier_density: str = _f("", "Per-tier FLASC density both ways, e.g. `0.0625,0.25,1` (the last "
                           "entry for higher tiers).")
    tier_codec_up: str = _f("", "Per-tier `codec-up`, e.g. `affine:2,affine:4,fp32`.")
    tier_codec_down: str = _f("", "Per-tier `codec-down`.")
    tier_rank: str = _f("", "Per-tier rank budget (LoRA-A2) / client rank (FlexLoRA, HetLoRA).")
    # --- output ---
    run_dir: str = _f("runs", "Where run folders go (docs/records.md); a relative path (like a "
                      "relative `data-dir`, `resume` or local `model`) is resolved against the "
                      "directory the launcher (`./run`, `fedlora.launch`) was started in.")
    run_name: str = _f("", "Run folder name, one plain folder name; empty = timestamp + method.")
    # --- checkpoints ---
    resume: str = _f("", "Continue a crashed run from its last complete round: a run folder, or "
                     "`auto` (this `run-name`'s folder if it holds a checkpoint, else a fresh start) "
                     "(docs/resume.md).")
    keep_checkpoints: int = _f(2, "Per-round checkpoints kept in `<run>/checkpoints/` (the newest "
                               "K; 0: none).")

    @classmethod
    def keys(cls) -> dict[str, Any]:
        """``{run-config key: default}`` for every knob."""
        return {_key(f.name): f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config``; keys fedlora does not know are ignored
        (Flower or other apps may add their own), wrong types raise a ValueError naming the
        key."""
        kwargs: dict[str, Any] = {}
        known = {_key(f.name): f for f in dataclasses.fields(cls)}
        for key, value in run_config.items():
            f = known.get(key)
            if f is None:
                continue
            kwargs[f.name] = _coerce(key, value, type(f.default))
        return cls(**kwargs)

    def lr_at(self, server_round: int) -> float:
        """Local learning rate of round ``server_round`` (1-indexed) under ``lr-schedule``:
        ``constant`` = ``lr``; ``cosine`` = ``lr``·½(1 + cos(π(t−1)/T)) over T =
        ``num-server-rounds`` (round 1 trains at ``lr``, the last at a small fraction of it)."""
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "cosine":
            t = min(max(int(server_round), 1), max(self.num_server_rounds, 1))
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * (t - 1) / max(self.num_server_rounds, 1)))
        raise ValueError(f"run-config 'lr-schedule' must be 'constant' or 'cosine', "
                         f"got {self.lr_schedule!r}")

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"run-config {key!r} must be true/false, got {value!r}")
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typ is str and isinstance(value, str):
        return value
    raise ValueError(f"run-config {key!r} must be {typ.__name__}, got {value!r}")


def check_at_least(key: str, value: float, low: float = 0.0, note: str = "",
                   strict: bool = False) -> None:
    """``value`` must be a finite number >= ``low`` (> with ``strict``): else a ValueError naming
    the run-config ``key`` (``note`` explains a special value, e.g. "0: off")."""
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        rel = ">" if strict else ">="
        extra = f" ({note})" if note else ""
        raise ValueError(f"run-config {key!r} must be {rel} {low:g}{extra}, got {value}")


_CASTS = {"str": str, "int": int, "float": float, "bool": bool}


def settings_view(cls: type, cfg: RunConfig, prefix: str = "",
                  renames: Mapping[str, str] | None = None) -> Any:
    """A typed view of part of the run config: dataclass ``cls`` with each field read from the
    RunConfig attribute ``prefix + field`` (or ``renames[field]``) and converted to the field's
    declared type (str/int/float/bool). Defaults live in :class:`RunConfig` alone; a field with
    no run-config key is an AttributeError naming it."""
    renames = renames or {}
    values = {}
    for f in dataclasses.fields(cls):
        key = renames.get(f.name, prefix + f.name)
        if not hasattr(cfg, key):
            raise AttributeError(f"{cls.__name__}.{f.name}: RunConfig has no {key!r}")
        values[f.name] = _CASTS[str(f.type)](getattr(cfg, key))
    return cls(**values)


def split_list(value: str) -> list[str]:
    """``"a, b,c"`` → ``["a", "b", "c"]``; empty string → ``[]``."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def node_tier(cfg: RunConfig, node_config: Mapping[str, Any]) -> int:
    """A node's tier: its node config ``tier`` if set (deployment), else ``tier-map`` indexed
    by ``partition-id`` (cycled; simulation cannot set per-node config), else 0."""
    if "tier" in node_config:
        return int(node_config["tier"])
    tiers = split_list(cfg.tier_map)
    if not tiers:
        return 0
    return int(tiers[int(node_config.get("partition-id", 0)) % len(tiers)])


def tier_value(values: str, tier: int, default: Any) -> Any:
    """Entry ``tier`` of a comma list (the last entry for higher tiers), else ``default``."""
    items = split_list(values)
    if not items:
        return default
    return type(default)(items[min(tier, len(items) - 1)])
