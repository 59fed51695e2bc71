"""The round protocol in one place: what a train message tells a node and what its reply
reports, as types, with the only spelling of every wire key (no torch, no numpy; Flower is
imported only to build a record, so the launcher's config check can import this module).

* :class:`Uploads`: what a method's replies can be (weights, either, updates).
* :class:`TrainInstruction` ⇄ the train message's ``ConfigRecord`` (:meth:`~TrainInstruction.
  to_config` / :meth:`~TrainInstruction.from_config`), with :class:`DownInstruction` (how to
  apply the download), :class:`DPInstruction` and :class:`SecAggInstruction` inside.
* :class:`TrainReply` ⇄ the reply's ``MetricRecord``: :meth:`~TrainReply.from_record` treats it
  as hostile input (:class:`MalformedReply` names what is wrong) and is the only reader of it.
Keys are written in the order the messages have always had them (byte-identical messages);
run-config keys of the same name live in :mod:`fedlora.config` (another namespace).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

# ------------------------------------------------------------------ the train message's keys
BASE_FINGERPRINT = "base-fingerprint"
DP, DP_MECHANISM, DP_CLIP, DP_NOISE = "dp", "dp-mechanism", "dp-clip", "dp-noise-multiplier"
SERVER_ROUND, METHOD = "server-round", "method"
CODEC_DOWN, CODEC_UP, CODEC_KEY_ID = "codec-down", "codec-up", "codec-key-id"
TIER, UPLOAD = "tier", "upload"
DOWN_MODE, DOWN_BASE, DOWN_DIGEST, DOWN_FROM_INIT = ("down-mode", "down-base", "down-digest",
                                                      "down-from-init")
RANK_BUDGET, HETLORA_GAMMA, FLASC_FREEZE = "rank-budget", "hetlora-gamma", "flasc-freeze"
SECAGG_ROUTED, SECAGG_INDEX, SECAGG_TOTAL = "secagg-routed", "secagg-index", "secagg-total"
SECAGG_DENSITY, SECAGG_COORDS_SEED = "secagg-density", "secagg-coords-seed"
SECAGG_UNION = "secagg-union"
# ------------------------------------------------------------------ the reply's metric keys
NUM_EXAMPLES, PAYLOAD_UP, PARAMS_UP = "num-examples", "payload-up", "params-up"
RANK, RANKS_SELECTED, DP_CLIPPED = "rank", "ranks-selected", "dp-clipped"
# ------------------------------------------------------------------ the query reply's keys
PARTITION_ID = "partition-id"   # (and TIER)

#: every key of a train message and of its reply (tests: spelled nowhere else in fedlora)
TRAIN_KEYS = (BASE_FINGERPRINT, DP, DP_MECHANISM, DP_CLIP, DP_NOISE, SERVER_ROUND, METHOD,
              CODEC_DOWN, CODEC_UP, CODEC_KEY_ID, TIER, UPLOAD, DOWN_MODE, DOWN_BASE,
              DOWN_DIGEST, DOWN_FROM_INIT, RANK_BUDGET, HETLORA_GAMMA, FLASC_FREEZE,
              SECAGG_ROUTED, SECAGG_INDEX, SECAGG_UNION, SECAGG_TOTAL, SECAGG_DENSITY,
              SECAGG_COORDS_SEED)
REPLY_KEYS = (NUM_EXAMPLES, PAYLOAD_UP, PARAMS_UP, RANK, RANKS_SELECTED, DP_CLIPPED)


class Uploads(str, Enum):
    """What a method's replies can be; the train message's ``upload`` tells the node."""

    WEIGHTS = "weights"   # the method aggregates weights: upload=delta is refused
    EITHER = "either"     # weights, or the update with upload=delta (the server adds the mean)
    UPDATES = "updates"   # the replies are updates already: upload=delta changes nothing

    def replies_are_deltas(self, upload: str) -> bool:
        """Whether a run with run-config ``upload`` gets updates from this method's nodes."""
        return self is Uploads.UPDATES or (self is Uploads.EITHER and upload == "delta")


# ============================================================================ train message


@dataclass(frozen=True)
class DownInstruction:
    """How the node applies its download (:mod:`.downlink`): ``full`` or ``delta`` (onto the
    copy whose digest is ``base``; ``from_init``: that copy may be the run's initial state),
    and the digest the result must have (None: a full download in a run without delta
    downloads, nothing to check)."""

    mode: str = "full"
    base: str | None = None
    digest: str | None = None
    from_init: bool = False

    def entries(self) -> dict[str, Any]:
        out: dict[str, Any] = {DOWN_MODE: self.mode}
        if self.base is not None:
            out[DOWN_BASE] = self.base
        if self.digest is not None:
            out[DOWN_DIGEST] = self.digest
        if self.from_init:
            out[DOWN_FROM_INIT] = True
        return out

    @classmethod
    def from_config(cls, conf: Mapping[str, Any]) -> "DownInstruction":
        return cls(str(conf.get(DOWN_MODE, "full")),
                   str(conf[DOWN_BASE]) if DOWN_BASE in conf else None,
                   str(conf[DOWN_DIGEST]) if DOWN_DIGEST in conf else None,
                   bool(conf.get(DOWN_FROM_INIT, False)))


@dataclass(frozen=True)
class DPInstruction:
    """The round's differential privacy for the node (:func:`fedlora.privacy.privatize`)."""

    mode: str                  # central / local
    mechanism: str
    clip: float
    noise_multiplier: float

    def entries(self) -> dict[str, Any]:
        return {DP: self.mode, DP_MECHANISM: self.mechanism, DP_CLIP: float(self.clip),
                DP_NOISE: float(self.noise_multiplier)}

    @classmethod
    def from_config(cls, conf: Mapping[str, Any]) -> "DPInstruction | None":
        """None when the message carries no DP (``dp`` absent or ``off``)."""
        mode = str(conf.get(DP, "off"))
        if mode == "off":
            return None
        return cls(mode, str(conf.get(DP_MECHANISM, "gaussian")), float(conf[DP_CLIP]),
                   float(conf.get(DP_NOISE, 0.0)))


@dataclass(frozen=True)
class SecAggInstruction:
    """Secure aggregation's part of a train message (:mod:`.secure`): the routed key shares,
    the node's index in the session, the update's size, the round's coordinate draw and
    whether this is a rank-union round's indicator stage. Parsed strictly: the node checks
    every field the server announces (ValueError naming the field)."""

    routed: bytes
    index: int
    total: int
    density: float
    coords_seed: int
    union: bool = False

    def entries(self) -> dict[str, Any]:
        out: dict[str, Any] = {SECAGG_ROUTED: self.routed, SECAGG_INDEX: int(self.index)}
        if self.union:
            out[SECAGG_UNION] = True
        out.update({SECAGG_TOTAL: int(self.total), SECAGG_DENSITY: float(self.density),
                    SECAGG_COORDS_SEED: int(self.coords_seed)})
        return out

    @classmethod
    def from_config(cls, conf: Mapping[str, Any]) -> "SecAggInstruction | None":
        if SECAGG_ROUTED not in conf:
            return None
        routed, index, total, d, seed = (conf.get(k) for k in (
            SECAGG_ROUTED, SECAGG_INDEX, SECAGG_TOTAL, SECAGG_DENSITY, SECAGG_COORDS_SEED))
        if not isinstance(routed, bytes):
            raise ValueError(f"{SECAGG_ROUTED} is not bytes")
        for key, v in ((SECAGG_INDEX, index), (SECAGG_TOTAL, total)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{key} {v!r} is not a non-negative integer")
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < float(d) <= 1:
            raise ValueError(f"{SECAGG_DENSITY} {d!r} is not a number in (0, 1]")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
            raise ValueError(f"{SECAGG_COORDS_SEED} {seed!r} is not an integer in [0, 2^63)")
        union = conf.get(SECAGG_UNION, False)
        if not isinstance(union, bool):
            raise ValueError(f"{SECAGG_UNION} {union!r} is not a bool")
        return cls(routed, index, total, float(d), seed, union)


@dataclass(frozen=True)
class TrainInstruction:
    """Everything a train message tells a node, besides its payload. Built by the server
    (``configure_train``; a method adds its fields through ``node_config``: ``rank_budget``,
    ``hetlora_gamma``, ``flasc_freeze``), parsed once by the node (``client_app``). An
    optional field that is None is not sent."""

    server_round: int = 0
    method: str = ""
    codec_down: str = "fp32"
    codec_up: str = "fp32"
    tier: int = 0
    upload: str = "weights"           # "delta": the node sends trained − received
    codec_key_id: int | None = None   # rotating codecs: who the upload's codec key names
    base_fingerprint: str | None = None
    dp: DPInstruction | None = None
    down: DownInstruction = field(default_factory=DownInstruction)
    rank_budget: int | None = None    # LoRA-A2, FlexLoRA, HetLoRA
    hetlora_gamma: float | None = None
    flasc_freeze: str | None = None
    secagg: SecAggInstruction | None = None

    @property
    def uploads_delta(self) -> bool:
        return self.upload == "delta"

    def entries(self) -> dict[str, Any]:
        """The ConfigRecord's entries, in the order the train message has always had."""
        out: dict[str, Any] = {}
        if self.base_fingerprint is not None:
            out[BASE_FINGERPRINT] = self.base_fingerprint
        if self.dp is not None:
            out.update(self.dp.entries())
        out.update({SERVER_ROUND: int(self.server_round), METHOD: self.method,
                    CODEC_DOWN: self.codec_down, CODEC_UP: self.codec_up})
        if self.codec_key_id is not None:
            out[CODEC_KEY_ID] = int(self.codec_key_id)
        out.update({TIER: int(self.tier), UPLOAD: self.upload, **self.down.entries()})
        for key, value, kind in ((RANK_BUDGET, self.rank_budget, int),
                                 (HETLORA_GAMMA, self.hetlora_gamma, float),
                                 (FLASC_FREEZE, self.flasc_freeze, str)):
            if value is not None:
                out[key] = kind(value)
        if self.secagg is not None:
            out.update(self.secagg.entries())
        return out

    def to_config(self) -> Any:
        """The train message's ``ConfigRecord``."""
        from flwr.app import ConfigRecord

        return ConfigRecord(self.entries())

    @classmethod
    def from_config(cls, conf: Mapping[str, Any]) -> "TrainInstruction":
        """Parse a train message's config (a ``ConfigRecord`` or any mapping); ``server-round``,
        ``method`` and ``codec-up`` must be there (KeyError), the rest has defaults."""
        def opt(key: str, kind: Any) -> Any:
            return kind(conf[key]) if key in conf else None

        return cls(
            server_round=int(conf[SERVER_ROUND]), method=str(conf[METHOD]),
            codec_down=str(conf.get(CODEC_DOWN, "fp32")), codec_up=str(conf[CODEC_UP]),
            tier=int(conf.get(TIER, 0)), upload=str(conf.get(UPLOAD, "weights")),
            codec_key_id=opt(CODEC_KEY_ID, int), base_fingerprint=opt(BASE_FINGERPRINT, str),
            dp=DPInstruction.from_config(conf), down=DownInstruction.from_config(conf),
            rank_budget=opt(RANK_BUDGET, int), hetlora_gamma=opt(HETLORA_GAMMA, float),
            flasc_freeze=opt(FLASC_FREEZE, str), secagg=SecAggInstruction.from_config(conf))


def base_config(fingerprint: str) -> Any:
    """The ServerApp's train config for every round (Flower's ``train_config``): the base
    model's fingerprint; :meth:`TrainInstruction` reads it back with :func:`base_of`."""
    from flwr.app import ConfigRecord

    return ConfigRecord({BASE_FINGERPRINT: fingerprint})


def base_of(config: Mapping[str, Any]) -> str | None:
    """The fingerprint in a train config :func:`base_config` made (None if absent)."""
    return str(config[BASE_FINGERPRINT]) if BASE_FINGERPRINT in config else None


# ============================================================================ reply


class MalformedReply(ValueError):
    """A reply whose content is not a valid upload for this round."""


MAX_EXAMPLES = 1 << 53    # larger counts are not exact integers in a float64 MetricRecord value
MAX_METRICS = 64          # metrics one reply may carry (honest replies: a handful)
MAX_METRIC_NAME = 128


def positive_examples(metrics: Mapping[str, Any]) -> int:
    """``num-examples``: a positive integer (an int, or an integral float) below 2**53."""
    n = metrics.get(NUM_EXAMPLES)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        raise MalformedReply(f"num-examples must be a positive number, got {n!r}")
    if n != int(n) or n >= MAX_EXAMPLES:
        raise MalformedReply(f"num-examples must be an integer below 2**53, got {n!r}")
    return int(n)


def reply_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The reply's scalar metrics as floats; a non-finite value (scalar or in a list), too many
    metrics or an overlong name raise MalformedReply. List values are checked, not kept."""
    if len(metrics) > MAX_METRICS:
        raise MalformedReply(f"{len(metrics)} metrics in reply (at most {MAX_METRICS})")
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if len(k) > MAX_METRIC_NAME:
            raise MalformedReply(f"metric name of {len(k)} characters (at most "
                                 f"{MAX_METRIC_NAME})")
        values = v if isinstance(v, list) else [v]
        for x in values:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise MalformedReply(f"metric {k[:40]!r} is not a number: {type(x).__name__}")
            try:
                finite = math.isfinite(x)
            except OverflowError:
                finite = False
            if not finite:
                raise MalformedReply(f"metric {k[:40]!r} is not finite ({x!r})")
        if not isinstance(v, list):
            out[k] = float(v)
    return out


#: the reply's typed metrics: (field, key), in the order a reply's record has them
_TYPED = (("ranks_selected", RANKS_SELECTED), ("params_up", PARAMS_UP), ("rank", RANK),
          ("dp_clipped", DP_CLIPPED))


@dataclass
class TrainReply:
    """What a node reports with its upload: its example count, the task's training metrics
    (``metrics``: free names, e.g. ``train-loss``) and the protocol's own: values it put on
    the wire (``params_up``), LoRA-A2's ``ranks_selected``, HetLoRA's pruned ``rank``, DP's
    ``dp_clipped`` (1.0 / 0.0) and the payload's size (``payload_up``, set by the ClientApp).
    None: not reported."""

    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    params_up: float | None = None
    ranks_selected: float | None = None
    rank: float | None = None
    dp_clipped: float | None = None
    payload_up: float | None = None

    def entries(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.metrics)
        for name, key in _TYPED:
            if getattr(self, name) is not None:
                out[key] = getattr(self, name)
        out[NUM_EXAMPLES] = int(self.num_examples)
        if self.payload_up is not None:
            out[PAYLOAD_UP] = self.payload_up
        return out

    def to_record(self) -> Any:
        """The reply's ``MetricRecord``."""
        from flwr.app import MetricRecord

        return MetricRecord(self.entries())

    def scalars(self) -> dict[str, float]:
        """Every metric as the server keeps it (floats; what a round's record averages)."""
        return {k: float(v) for k, v in self.entries().items()}

    @classmethod
    def from_scalars(cls, num_examples: int, scalars: Mapping[str, float]) -> "TrainReply":
        """From validated metrics (:func:`reply_metrics`): the protocol's keys into their
        fields, the rest into ``metrics``."""
        typed = {name: float(scalars[key]) for name, key in (*_TYPED, ("payload_up", PAYLOAD_UP))
                 if key in scalars}
        rest = {k: float(v) for k, v in scalars.items()
                if k not in REPLY_KEYS}
        return cls(int(num_examples), rest, **typed)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "TrainReply":
        """A reply's MetricRecord read as hostile input: ``num-examples`` a positive integer
        below 2**53, at most :data:`MAX_METRICS` finite numbers with names of at most
        :data:`MAX_METRIC_NAME` characters; MalformedReply otherwise."""
        n = positive_examples(record)
        return cls.from_scalars(n, reply_metrics(record))
