"""The whole protocol in one process, for tests and ``benchmarks/secagg.py``: every node's
:class:`~.protocol.ClientSession` and the :class:`~.protocol.ServerSession`, the bytes moved
between them counted per node and stage. Dropouts are simulated by nodes that stop answering
before a given stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .protocol import ClientSession, Params, ServerSession

STAGES = ("advertise", "share", "masked", "unmask")


@dataclass
class LocalRound:
    """Bytes per node: ``down[stage][i]`` (server → node) and ``up[stage][i]``."""

    params: Params
    down: dict[str, dict[int, int]] = field(default_factory=lambda: {s: {} for s in STAGES})
    up: dict[str, dict[int, int]] = field(default_factory=lambda: {s: {} for s in STAGES})
    server: ServerSession | None = None

    def run(self, q: Mapping[int, np.ndarray], stop_before: Mapping[int, str] | None = None,
            rng: np.random.Generator | None = None) -> np.ndarray:
        """Run a round over nodes ``q.keys()`` (their quantized updates); ``stop_before[i]``:
        the stage node i no longer answers. Returns the unmasked sum (RecoveryError when too
        many dropped)."""
        p, stop = self.params, dict(stop_before or {})
        rng = rng or np.random.default_rng()
        srv = self.server = ServerSession(p)
        nodes = {i: ClientSession(p, i) for i in q}

        def alive(i: int, stage: str) -> bool:
            s = stop.get(i)
            return s is None or STAGES.index(stage) < STAGES.index(s)

        for i, c in nodes.items():
            self.down["advertise"][i] = len(p.to_bytes())
            if alive(i, "advertise"):
                blob = c.advertise()
                self.up["advertise"][i] = len(blob)
                srv.receive_advertise(i, blob)
        for i, req in srv.key_requests().items():
            self.down["share"][i] = len(req)
            if alive(i, "share"):
                blob = nodes[i].share_keys(req)
                self.up["share"][i] = len(blob)
                srv.receive_shares(i, blob)
        for i, req in srv.routed().items():
            self.down["masked"][i] = len(req)
            if alive(i, "masked"):
                blob = nodes[i].masked_input(req, q[i], rng)
                self.up["masked"][i] = len(blob)
                srv.receive_masked(i, blob)
        for i, req in srv.unmask_requests().items():
            self.down["unmask"][i] = len(req)
            if alive(i, "unmask"):
                blob = nodes[i].unmask(req)
                self.up["unmask"][i] = len(blob)
                srv.receive_unmask(i, blob)
        return srv.result()
