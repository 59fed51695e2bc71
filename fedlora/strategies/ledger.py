"""The round ledger: what happened in one round — bytes per node and direction, control
traffic, failures, dropped/clipped/capped replies — and the round record made from it (the
``rounds.jsonl`` schema documented in docs/records.md)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

log = logging.getLogger("flwr.fedlora")


@dataclass
class RoundStats:
    round: int
    t_start: float = field(default_factory=time.time)
    sent: dict[int, int] = field(default_factory=dict)          # node → wire bytes down
    payload_down: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)      # node → wire bytes up
    payload_up: dict[int, int] = field(default_factory=dict)
    params_up: dict[int, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # error replies
    dropped: list[dict[str, Any]] = field(default_factory=list)   # replies that did not decode
    asked: dict[int, Any] = field(default_factory=dict)         # node → its train msg's Metadata
    stray: list[dict[str, Any]] = field(default_factory=list)     # not this round's answer: node,
    #                                    reason, bytes (stale, second, unsolicited)
    train_metrics: dict[str, float] = field(default_factory=dict)
    control_bytes: int = 0                                       # tier queries etc.
    full_downloads: list[int] = field(default_factory=list)      # delta mode: nodes sent in full
    excluded: list[dict[str, Any]] = field(default_factory=list)  # bad query answers: node, reason
    capped: list[dict[str, Any]] = field(default_factory=list)    # node, reported, used weight
    clipped: list[dict[str, Any]] = field(default_factory=list)   # node, norm, bound
    norm_bound: float | None = None                              # the round's update-norm bound
    update_norms: list[float] = field(default_factory=list)      # valid replies' update norms
    rejected: str = ""                                           # why the round kept the global
    clients: int | None = None                                   # replies aggregated
    aggregated: list[Any] = field(default_factory=list)          # ... their node ids
    extra: dict[str, Any] = field(default_factory=dict)          # loop-specific entries
    #                                    (the async loop's version, staleness histogram ...)

    def drop(self, node: Any, err: Exception) -> None:
        """A reply left out of this round: recorded with its node id and reason, and logged."""
        self.dropped.append({"node": node, "reason": f"{type(err).__name__}: {err}"[:500]})
        log.warning("round %d: dropped reply of node %s: %s: %s", self.round, node,
                    type(err).__name__, str(err)[:400])

    def record(self, tier_of: Callable[[int], int], partitions: Mapping[int, int]
               ) -> dict[str, Any]:
        """The round's record (``tier_of``/``partitions``: the node directory's view)."""
        s = self
        return {
            "round": s.round,
            "clients": s.clients if s.clients is not None else len(s.received) - len(s.dropped),
            "failures": len(s.failures),
            "dropped": len(s.dropped) + len(s.stray),
            "bytes_down": sum(s.sent.values()),
            "bytes_up": sum(s.received.values()),
            "bytes_up_dropped": sum(d["bytes"] for d in s.stray),
            "payload_down": sum(s.payload_down.values()),
            "payload_up": sum(s.payload_up.values()),
            "params_up": sum(s.params_up.values()),
            "control_bytes": s.control_bytes,
            "full_downloads": len(s.full_downloads),
            "tiers": {str(k): tier_of(k) for k in s.sent},
            "partitions": sorted(partitions.get(k, -1) for k in s.sent),
            "bytes_down_per_node": {str(k): v for k, v in s.sent.items()},
            "bytes_up_per_node": {str(k): v for k, v in s.received.items()},
            "failure_reasons": s.failures,
            "dropped_reasons": s.dropped + [{"node": d["node"], "reason": d["reason"]}
                                            for d in s.stray],
            "excluded_nodes": s.excluded,
            "capped_weights": s.capped,
            "clipped": s.clipped,
            "norm_bound": s.norm_bound,
            "rejected": s.rejected,
            "train_metrics": s.train_metrics,
            "round_s": round(time.time() - s.t_start, 3),
            **s.extra,
        }

    def replied(self) -> set:
        """Nodes whose reply arrived and decoded (their downloads are committed)."""
        bad = {d.get("node") for d in self.dropped} | {f.get("node") for f in self.failures}
        return set(self.received) - bad


def empty_record(server_round: int) -> dict[str, Any]:
    """The record of a round the strategy never configured (round 0: the initial model)."""
    return {"round": server_round, "clients": 0, "failures": 0, "dropped": 0,
            "bytes_down": 0, "bytes_up": 0, "payload_down": 0, "payload_up": 0}
