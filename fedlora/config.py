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


@dataclass(frozen=True)
class RunConfig:
    # --- federation and method ---
    method: str = "flocora"
    num_server_rounds: int = 5
    fraction_train: float = 0.5
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 3600.0
    client_sampling: str = "partition"
    seed: int = 42
    # --- model ---
    task: str = "vision"
    model: str = "resnet8"
    feature_maps: int = 64
    norm: str = "group"
    lora_rank: int = 32
    lora_alpha: float = 0.0
    model_seed: int = 0
    # --- text task ---
    max_length: int = 64
    train_head: bool = False
    lora_targets: str = ""
    autocast_bf16: bool = False
    # --- data ---
    dataset: str = "fashion-mnist"
    data_dir: str = ""
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    max_examples_per_client: int = 1000
    eval_max_examples: int = 0
    eval_every: int = 1
    # --- local training ---
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    lr_schedule: str = "constant"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    augment: bool = True
    client_threads: int = 1
    device: str = "auto"
    # --- communication ---
    codec_down: str = "fp32"
    codec_up: str = "fp32"
    error_feedback: bool = False
    upload: str = "weights"
    download: str = "full"
    codec_down_full: str = ""
    payload_table: str = "digest"
    delta_max_nodes: int = 10000
    # --- robustness ---
    max_weight_ratio: float = 3.0
    equal_weights: bool = False
    update_norm_bound: float = 0.0
    norm_bound_factor: float = 5.0
    norm_bound_action: str = "clip"
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    stream_aggregation: bool = True
    # --- differential privacy ---
    dp: str = "off"
    dp_mechanism: str = "gaussian"
    dp_clip: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_target_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_adaptive_clip: bool = False
    dp_target_quantile: float = 0.5
    dp_clip_lr: float = 0.2
    dp_count_stddev: float = 0.0
    # --- FLASC ---
    density_down: float = 1.0
    density_up: float = 1.0
    density_decay: float = 1.0
    density_decay_rounds: int = 10
    server_opt: str = "adamw"
    server_lr: float = 0.001
    server_weight_decay: float = 0.01
    flasc_freeze: str = "none"
    # --- LoRA-A2 / rank-heterogeneous baselines ---
    rank_budget: int = 1
    lr_b_ratio: float = 5.0
    score_epochs: int = 1
    hetlora_gamma: float = 0.99
    # --- per-client tiers (comma lists; empty = off) ---
    tier_map: str = ""
    tier_density: str = ""
    tier_codec_up: str = ""
    tier_codec_down: str = ""
    tier_rank: str = ""
    # --- output ---
    run_dir: str = "runs"
    run_name: str = ""
    # --- checkpoints ---
    resume: str = ""
    keep_checkpoints: int = 2

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
