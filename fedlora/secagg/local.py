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

        steps = [  # stage, the server's requests, the node's answer, the server's receive
            ("advertise", lambda: {i: p.to_bytes() for i in nodes},
             lambda i, req: nodes[i].advertise(), srv.receive_advertise),
            ("share", srv.key_requests, lambda i, req: nodes[i].share_keys(req),
             srv.receive_shares),
            ("masked", srv.routed, lambda i, req: nodes[i].masked_input(req, q[i], rng),
             srv.receive_masked),
            ("unmask", srv.unmask_requests, lambda i, req: nodes[i].unmask(req),
             srv.receive_unmask),
        ]
        for stage, requests, answer, receive in steps:
            for i, req in server(requests).items():
                self.down[stage][i] = len(req)
                if alive(i, stage):
                    blob = node(i, answer, i, req)
                    self.up[stage][i] = len(blob)
                    server(receive, i, blob)
        return server(srv.result)
