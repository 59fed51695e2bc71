"""The whole protocol in one process, for tests and ``benchmarks/secagg.py``: every node's
:class:`~.protocol.ClientSession` and the :class:`~.protocol.ServerSession`, the bytes moved
between them counted per node and stage. Dropouts are simulated by nodes that stop answering
before a given stage."""

from __future__ import annotations

import time
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
    client_s: dict[int, float] = field(default_factory=dict)  # each node's compute, seconds
    server_s: float = 0.0                                      # the server's compute, seconds

    def run(self, q: Mapping[int, np.ndarray], stop_before: Mapping[int, str] | None = None,
            rng: np.random.Generator | None = None) -> np.ndarray:
        """Run a round over nodes ``q.keys()`` (their quantized updates); ``stop_before[i]``:
        the stage node i no longer answers. Returns the unmasked sum (RecoveryError when too
        many dropped)."""
        p, stop = self.params, dict(stop_before or {})
        rng = rng or np.random.default_rng()
        clock = time.perf_counter

        def node(i: int, f, *args):
            t = clock()
            out = f(*args)
            self.client_s[i] = self.client_s.get(i, 0.0) + clock() - t
            return out

        def server(f, *args):
            t = clock()
            out = f(*args)
            self.server_s += clock() - t
            return out

        srv = self.server = ServerSession(p)
        nodes = {i: node(i, ClientSession, p, i) for i in q}

        def alive(i: int, stage: str) -> bool:
            s = stop.get(i)
            return s is None or STAGES.index(stage) < STAGES.index(s)

        for i, c in nodes.items():
            self.down["advertise"][i] = len(p.to_bytes())
            if alive(i, "advertise"):
                blob = node(i, c.advertise)
                self.up["advertise"][i] = len(blob)
                server(srv.receive_advertise, i, blob)
        for i, req in server(srv.key_requests).items():
            self.down["share"][i] = len(req)
            if alive(i, "share"):
                blob = node(i, nodes[i].share_keys, req)
                self.up["share"][i] = len(blob)
                server(srv.receive_shares, i, blob)
        for i, req in server(srv.routed).items():
            self.down["masked"][i] = len(req)
            if alive(i, "masked"):
                blob = node(i, nodes[i].masked_input, req, q[i], rng)
                self.up["masked"][i] = len(blob)
                server(srv.receive_masked, i, blob)
        for i, req in server(srv.unmask_requests).items():
            self.down["unmask"][i] = len(req)
            if alive(i, "unmask"):
                blob = node(i, nodes[i].unmask, req)
                self.up["unmask"][i] = len(blob)
                server(srv.receive_unmask, i, blob)
        return server(srv.result)
