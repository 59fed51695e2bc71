"""Real ClientApps in child processes, one per node, driven by the real ServerApp over pipes.

The server side (``fedlora.server_app.run``) runs in the calling process with a :class:`ProcGrid`;
every message for a node is serialized with Flower's own protobuf serde (the bytes a SuperNode
receives), sent to that node's child, deserialized there and handed to the ClientApp
(``fedlora.client_app:app``, loaded as Flower loads it). The child keeps the node's
``Context`` (its persistent state) across rounds, as a SuperNode does, and reports, per message:
wall and CPU seconds of the ClientApp call, peak RSS so far, the message bytes each way, and the
node's persistent state (``context.state``) in memory and serialized.

Used by ``benchmarks/footprint.py`` (client footprint) and ``tests/test_lazy_imports.py``
(which modules a vision node imports).

    python -m benchmarks.nodeproc   # the child's entry point (stdin/stdout: framed messages)
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WATCH = ("transformers", "peft", "datasets", "pyarrow", "pandas", "scipy", "sklearn",
         "flwr_datasets", "tokenizers", "safetensors", "numba")


def _send(stream, payload: bytes) -> None:
    stream.write(struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def _recv(stream) -> bytes:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("the other end closed the pipe")
    (n,) = struct.unpack("<Q", head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("short read")
    return data


def _rss_peak_bytes() -> int:
    """This process's peak resident set: ``VmHWM`` of its own address space. Not
    ``ru_maxrss``: Linux carries that across ``execve`` from the process that forked it, so a
    child of a big parent would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB elsewhere


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def state_bytes(state) -> dict:
    """A node's persistent state: numpy bytes of its arrays (memory), and the size of the
    whole RecordDict serialized as Flower does (what persisting it takes on disk)."""
    from flwr.common.serde import recorddict_to_proto

    mem = 0
    for rec in state.array_records.values():
        for arr in rec.values():
            mem += len(arr.data)
    return {"state_mem": mem, "state_disk": len(recorddict_to_proto(state).SerializeToString()),
            "state_keys": sorted(state.keys())}


def child_main() -> None:
    """Child: a line of JSON setup on stdin (run_config, node_config, node_id), then framed
    protobuf messages; answers each with a framed reply and a framed JSON report."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed goes to stderr, not into the frames
    setup = json.loads(_recv(stdin))
    t0, c0 = time.perf_counter(), _cpu_s()
    from flwr.app import Context, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.client_app import app  # what Flower's loader resolves "fedlora.client_app:app" to

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, setup["node_id"], 1
    ctx = Context(run_id=1, node_id=setup["node_id"], node_config=setup["node_config"],
                  state=RecordDict(), run_config=setup["run_config"])
    _send(stdout, json.dumps({"import_s": time.perf_counter() - t0,
                              "import_cpu_s": _cpu_s() - c0,
                              "rss_peak": _rss_peak_bytes()}).encode())
    while True:
        try:
            raw = _recv(stdin)
        except EOFError:
            return
        msg = message_from_proto(ProtoMessage.FromString(raw))
        t, c = time.perf_counter(), _cpu_s()
        reply = app(msg, ctx)
        wall, cpu = time.perf_counter() - t, _cpu_s() - c
        out = message_to_proto(reply).SerializeToString()
        import torch

        report = {"type": msg.metadata.message_type, "wall_s": wall, "cpu_s": cpu,
                  "rss_peak": _rss_peak_bytes(), "bytes_down": len(raw), "bytes_up": len(out),
                  "threads": torch.get_num_threads(), **state_bytes(ctx.state),
                  "modules": sorted(m for m in WATCH if m in sys.modules),
                  "reply_records": sorted(reply.content.keys()),
                  "metrics": {k: v for rec in reply.content.metric_records.values()
                              for k, v in rec.items()}}
        _send(stdout, out)
        _send(stdout, json.dumps(report).encode())


class Node:
    """One child process holding one node's ClientApp and Context."""

    def __init__(self, node_id: int, run_config: dict, node_config: dict, env=None,
                 nice: int = 0) -> None:
        cmd = [sys.executable, "-m", "benchmarks.nodeproc"]
        if nice:
            cmd = ["nice", "-n", str(nice)] + cmd
        self.node_id = node_id
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        _send(self.proc.stdin, json.dumps({"node_id": node_id, "run_config": run_config,
                                           "node_config": node_config}).encode())
        self.start = json.loads(_recv(self.proc.stdout))
        self.reports: list[dict] = []

    def call(self, msg):
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        _send(self.proc.stdin, message_to_proto(msg).SerializeToString())
        reply = message_from_proto(ProtoMessage.FromString(_recv(self.proc.stdout)))
        self.reports.append(json.loads(_recv(self.proc.stdout)))
        reply.metadata.__dict__["_src_node_id"] = self.node_id  # what the SuperLink would set
        return reply

    def close(self) -> int:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its handle
            return self.proc.wait()


class ProcGrid:
    """A Flower Grid whose nodes are :class:`Node` children (sequential, one at a time)."""

    def __init__(self, run_config: dict, nodes: int, node_config=None,
                 nice: int = 0, env=None) -> None:
        """``node_config``: extra node-config keys, one dict for all nodes or a list (one
        per node)."""
        self.nodes = {}
        extra = node_config if isinstance(node_config, list) else [node_config or {}] * nodes
        try:
            for i in range(nodes):
                nc = {"partition-id": i, "num-partitions": nodes,
                      "data-dir": run_config.get("data-dir", ""), **extra[i]}
                self.nodes[101 + i] = Node(101 + i, run_config, nc, env=env, nice=nice)
        except BaseException:
            self.close()
            raise

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        return [self.nodes[m.metadata.dst_node_id].call(m) for m in list(messages)]

    def close(self) -> list[int]:
        return [n.close() for n in self.nodes.values()]


def run_with_nodes(run_config: dict, nodes: int, node_config=None, nice: int = 0) -> tuple[dict, dict]:
    """A whole run: the ServerApp here, ``nodes`` ClientApp children. Returns (the run's
    summary, {node_id: {"start": ..., "reports": [...]}})."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.config import RunConfig
    from fedlora.server_app import run

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # the server's
    grid = ProcGrid(run_config, nodes, node_config, nice=nice, env={**os.environ})
    try:
        summary = run(grid, RunConfig.from_run_config(run_config))
    finally:
        codes = grid.close()
    if any(codes):
        raise RuntimeError(f"a node process exited with {codes}")
    return summary, {n: {"start": node.start, "reports": node.reports}
                     for n, node in grid.nodes.items()}


if __name__ == "__main__":
    child_main()
