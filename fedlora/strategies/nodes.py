"""The node directory: what the server knows about the nodes — their tier and partition-id,
learnt with a ``query`` message — and which of them a round samples.

Query answers are node input: a tier that is not an integer in [0, 2**31) gives that node tier 0;
a partition-id that is neither that nor -1 (unknown) excludes the node from partition sampling for
the rest of the run, and so does a partition-id another connected node claimed first (one node
per partition-id: :meth:`NodeDirectory.settle_claims`). Each is logged and recorded
(``excluded_nodes`` of the round) with the node id and the reason; nothing in an answer can raise.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..wire import message_bytes
from .ledger import RoundStats
from .protocol import PARTITION_ID, TIER
from .replies import CONFIG_KEY, METRICS_KEY

log = logging.getLogger("flwr.fedlora")

#: more unknown nodes than this at once: the query is slow enough to warn about
MANY_UNKNOWN = 2000
MAX_TIER = 1 << 31        # tier / partition-id answers must be integers in [0, MAX_TIER)


def node_int(value: Any, what: str) -> int:
    """A tier or partition-id from a node's query answer: an integer (int or integral float) in
    [0, MAX_TIER); anything else raises ValueError saying why."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} {value!r} is not a number")
    if isinstance(value, float) and not np.isfinite(value):
        raise ValueError(f"{what} {value!r} is not finite")
    if value != int(value):
        raise ValueError(f"{what} {value!r} is not an integer")
    if not 0 <= value < MAX_TIER:
        raise ValueError(f"{what} {value!r} is outside [0, 2**31)")
    return int(value)


class NodeDirectory:
    """Tiers, partition-ids and exclusions by node id, and partition sampling.

    Parameters
    ----------
    seed
        The run's seed: round t samples with a generator seeded by (seed, t).
    ask
        Whether nodes must be asked at all (tiers or partition sampling in use).
    timeout
        Seconds to wait for query answers.
    """

    def __init__(self, seed: int, ask: bool, timeout: float) -> None:
        self.seed = int(seed)
        self.ask = bool(ask)
        self.timeout = float(timeout)
        self.tiers: dict[int, int] = {}        # node id → tier
        self.partitions: dict[int, int] = {}   # node id → partition-id (-1: unknown)
        self.excluded: dict[int, str] = {}     # node id → why it is left out of sampling

    def tier_of(self, node_id: int | None) -> int:
        return self.tiers.get(node_id, 0) if node_id is not None else 0

    def learn(self, grid: Grid, node_ids: list[int], stats: RoundStats) -> None:
        """Ask nodes not seen before for their tier and partition-id (a ``query`` message; the
        ClientApp answers from its node config). Its bytes are counted as control traffic of the
        round. A node that does not answer gets tier 0 and is sampled after the known ones."""
        unknown = [n for n in node_ids if n not in self.tiers]
        if not unknown or not self.ask:
            return
        if len(unknown) > MANY_UNKNOWN:
            log.warning("asking %d nodes for their tier and partition-id, one query message "
                        "each (~17 ms a node in Flower's simulation); without tiers, "
                        "client-sampling='flower' samples without asking", len(unknown))
        queries = [Message(RecordDict({CONFIG_KEY: ConfigRecord({"ask": "tier"})}),
                           message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        stats.control_bytes += sum(message_bytes(q) for q in queries)
        asked = set(unknown)
        claims: list[tuple[int, int]] = []
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            node = None
            try:
                node = reply.metadata.src_node_id
                if node not in asked:
                    raise ValueError("an answer from a node not asked, or a second answer")
                asked.discard(node)  # one answer per node
                if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
                    log.warning("node %s did not report its tier; using tier 0", node)
                    continue
                stats.control_bytes += message_bytes(reply, hashed=False)
                self._read_answer(stats, node, reply.content.metric_records[METRICS_KEY],
                                  claims)
            except Exception as err:  # never let a node's answer stop the round
                ours = node in unknown
                if ours:
                    self.tiers[node] = 0  # answered (badly): not asked again
                self.exclude(stats, node, f"bad answer to the tier query: "
                                          f"{type(err).__name__}: {err}", sampling=ours)
        self.settle_claims(grid, stats, claims)

    def settle_claims(self, grid: Grid, stats: RoundStats, claims: list[tuple[int, int]]
                      ) -> None:
        """One node per partition-id: ``claims`` ((node, partition-id), from one query) are
        granted in node-id order (ids the SuperLink assigns, not the node); a partition-id
        already held by another node that is still connected (``grid.get_node_ids()``) is
        refused and the claimant left out of partition sampling for the run, with the owner's
        id in the reason; one whose owner left the federation passes to the claimant (recorded
        under the old owner). So a node cannot duplicate another's slot in the sampling order."""
        owner = {p: n for n, p in self.partitions.items() if p >= 0}
        live: set | None = None
        for node, part in sorted(claims):
            held = owner.get(part)
            if held is not None and held != node:
                if live is None:
                    live = set(grid.get_node_ids())
                if held in live:
                    self.exclude(stats, node, f"partition-id {part} is already claimed by node "
                                              f"{held}; left out of partition sampling")
                    continue
                self.partitions.pop(held, None)
                stats.excluded.append({"node": held, "reason": f"partition-id {part} passed to "
                                       f"node {node}: this node is no longer connected"})
                log.warning("round %d: partition-id %d passed from node %s (gone) to node %s",
                            stats.round, part, held, node)
            self.partitions[node] = part
            owner[part] = node

    def _read_answer(self, stats: RoundStats, node: int, answer: Mapping[str, Any],
                     claims: list[tuple[int, int]]) -> None:
        self.tiers[node] = 0
        try:
            self.tiers[node] = node_int(answer.get(TIER, 0), "tier")
        except ValueError as err:
            self.exclude(stats, node, f"{err}; tier 0 used", sampling=False)
        part = answer.get(PARTITION_ID, -1)
        if part == -1 and not isinstance(part, bool):
            self.partitions[node] = -1
        else:
            try:
                claims.append((node, node_int(part, "partition-id")))  # granted by settle_claims
            except ValueError as err:
                self.exclude(stats, node, f"{err}; left out of partition sampling")

    def exclude(self, stats: RoundStats, node: Any, reason: str, sampling: bool = True) -> None:
        """Record a bad answer of ``node``; with ``sampling``, leave it out of partition
        sampling for the rest of the run."""
        reason = reason[:300]
        stats.excluded.append({"node": node, "reason": reason})
        log.warning("round %d: node %s: %s", stats.round, node, reason)
        if sampling and node is not None:
            self.excluded[node] = reason
            self.partitions.pop(node, None)

    def order_key(self, node_id: Any) -> tuple[int, int]:
        """The canonical order of nodes: by partition-id, unknown ones last by node id. Sampling
        and aggregation both use it, so a round's sums do not depend on Flower's node ids or on
        the order replies arrived in."""
        part = self.partitions.get(node_id, -1)
        nid = node_id if isinstance(node_id, int) and not isinstance(node_id, bool) else -1
        return (part if part >= 0 else 1 << 62, nid)

    def sample(self, server_round: int, all_nodes: list[int], k: int) -> list[int]:
        """``k`` nodes chosen by a generator seeded with (seed, round) over the nodes ordered by
        partition-id (:meth:`order_key`): the same partitions in every run with the same seed
        and the same set of partitions, whatever node ids Flower assigned. Unknown partitions
        sort last (by id); excluded nodes are not sampled."""
        order = sorted((n for n in all_nodes if n not in self.excluded), key=self.order_key)
        k = min(k, len(order))
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(server_round)])
        return [order[i] for i in sorted(rng.choice(len(order), size=k, replace=False).tolist())]

    def state_dict(self) -> dict[str, Any]:
        return {"tiers": dict(self.tiers), "partitions": dict(self.partitions),
                "excluded": dict(self.excluded)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tiers = {int(k): int(v) for k, v in state["tiers"].items()}
        self.partitions = {int(k): int(v) for k, v in state["partitions"].items()}
        self.excluded = {int(k): str(v) for k, v in state["excluded"].items()}
