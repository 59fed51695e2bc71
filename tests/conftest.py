"""Shared fixtures. Tests are offline: no network, no apt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "fashion-mnist-sample"


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests, like a client (client-threads = 1); also keeps
    timings sane on a busy 2-core machine. Use with ``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_dir() -> str:
    return str(SAMPLE)


@pytest.fixture
def task_identity():
    """Flower's Message() needs a run/node identity outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
    yield


class FakeGrid:
    """Nodes, and answers to the strategy's ``query`` messages as the ClientApp gives them
    (tier 0; partition-id = the node's position unless ``partition_of`` says otherwise)."""

    def __init__(self, nodes, partition_of=None):
        self.nodes = nodes
        self.partition_of = partition_of or {n: i for i, n in enumerate(nodes)}
        self.queries = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Message, MetricRecord, RecordDict

        out = []
        for m in messages:
            self.queries += 1
            node = m.metadata.dst_node_id
            reply = Message(RecordDict({"metrics": MetricRecord(
                {"tier": 0, "partition-id": self.partition_of[node]})}), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = node  # what the SuperLink would set
            out.append(reply)
        return out


class LazyRuns(dict):
    """name → result of ``run(name)``, computed on first use (so ``-k`` selects what runs)."""

    def __init__(self, run):
        super().__init__()
        self._run = run

    def __missing__(self, name):
        self[name] = self._run(name)
        return self[name]


def simulate(work, run_config: dict):
    """One simulated run (2 nodes) that must succeed and leave no process behind; returns
    (round records, run.json)."""
    import json

    from fedlora.launch import pids_with_env, run_simulation
    from fedlora.results import read_rounds

    res, run_dir = run_simulation(run_config, nodes=2, work_dir=work, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:]
    # every process of the run (SuperLink, SuperExec, simulation, Ray daemons and workers)
    # inherited FLWR_HOME=<work>/flwr-home: none may survive the run
    assert not pids_with_env(str(work)), "a process of this run is still alive"
    return read_rounds(run_dir), json.loads((run_dir / "run.json").read_text()), run_dir, \
        res.stdout


class Crash(RuntimeError):
    """What the ServerApp sees when the SuperLink under it dies."""


class InProcessGrid:
    """A Grid whose nodes are the real ClientApp functions in this process. ``crash_at``: raise
    :class:`Crash` when the train messages of that round are sent."""

    def __init__(self, run_config: dict, node_ids=(101, 102, 103), crash_at: int | None = None,
                 contexts: dict | None = None) -> None:
        from flwr.app import Context, RecordDict

        self.crash_at = crash_at
        self.contexts = contexts if contexts is not None else {
            n: Context(run_id=1, node_id=n, node_config={
                "partition-id": i, "num-partitions": len(node_ids),
                "data-dir": run_config["data-dir"]}, state=RecordDict(), run_config=run_config)
            for i, n in enumerate(node_ids)}
        self.train_rounds: list[int] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import MessageType

        from fedlora import client_app

        out = []
        for m in list(messages):
            node = m.metadata.dst_node_id
            if m.metadata.message_type == MessageType.TRAIN:
                rnd = int(m.content["config"]["server-round"])
                if rnd == self.crash_at:
                    raise Crash(f"SuperLink gone in round {rnd}")
                self.train_rounds.append(rnd)
                reply = client_app.train(m, self.contexts[node])
            elif m.metadata.message_type == f"{MessageType.QUERY}.secagg":
                reply = client_app.secagg(m, self.contexts[node])
            else:
                reply = client_app.query(m, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            out.append(reply)
        return out
