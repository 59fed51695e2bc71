"""A real deployment on loopback: ``flower-superlink`` + ``flower-supernode`` processes (one
``FLWR_HOME`` each, as on separate machines), driven by ``flwr run . <connection> --stream``.

1. plain HTTP (``insecure=True``), 2 SuperNodes, 2 rounds: records complete, and the bytes
   measured per message are the simulation's bytes for the same config, exactly, once the
   message *envelope* is set aside (see :func:`envelope_bytes`: ids of different digit lengths
   and Flower's two message-id formats are metadata, not content); Flower's own per-run traffic
   counter bounds them.
2. the default, secure deployment (TLS, SuperNode authentication, the SuperLink on 127.0.0.1
   only, SuperNodes through the nginx Fleet proxy): the registered nodes train 2 rounds, while an
   outsider who reaches the public port and holds the CA certificate can neither register a
   node key, nor list runs or nodes, nor submit a run, nor join with an unregistered key.
3. a SuperNode (its whole process group) is SIGKILLed while training in round 1 of 3 nodes
   (secure deployment): the run completes with the other 2 and the record carries the failure
   and Flower's reason.
4. the launcher's ports: never the same port twice, and a daemon whose port was taken before
   it bound it is started again on another one.

After every run no process of it may be alive (PIDs we saw, and anything whose environment still
names the run's work dir: every Flower process inherits its daemon's FLWR_HOME).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import fedlora.launch as launch
from fedlora.launch import (PROJECT, Deployment, Processes, descendants, flower_env,
                            nginx_binary, pids_with_env, run_simulation, write_connection)
from fedlora.results import read_rounds

pytestmark = pytest.mark.slow

CODEC_UP = "affine:8"
BASE = {
    "method": "flocora", "num-server-rounds": 2, "feature-maps": 16, "lora-rank": 8,
    "local-epochs": 1, "max-examples-per-client": 64, "batch-size": 32, "fraction-train": 1.0,
    "dataset": "npz", "partitioner": "iid", "codec-up": CODEC_UP,
}
# Message ids as the ServerApp sees them in a reply's ``reply_to_message_id``: a deployment
# SuperLink uses the message's object id (sha256, 64 hex digits); the simulation's InMemoryGrid
# assigns ``str(uuid4())`` (36 characters; flwr/superlink/grid/inmemory_grid.py).
DEPLOYMENT_MESSAGE_ID_LEN = 64
SIMULATION_MESSAGE_ID_LEN = 36


# ------------------------------------------------------------------------------------ helpers


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


class Watch(contextlib.AbstractContextManager):
    """Samples, every 0.5 s, every process started through ``procs`` and all its descendants
    (SuperExec, flwr-serverapp, flwr-clientapp...), keyed by (pid, start time) so that a reused
    PID is not mistaken for a survivor."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.seen: dict[tuple[int, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        for _, proc in list(self.procs.procs):
            for pid in (proc.pid, *descendants(proc.pid)):
                start = _start_time(pid)
                if start is not None and (pid, start) not in self.seen:
                    with contextlib.suppress(OSError):
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                        self.seen[(pid, start)] = cmd.decode(errors="replace")[:160]

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()

    def alive(self) -> list[str]:
        return [f"{pid} {cmd}" for (pid, start), cmd in self.seen.items()
                if _start_time(pid) == start]


def assert_no_orphans(work: Path, watch: Watch | None = None, wait: float = 10.0) -> None:
    """Nothing of this run may be alive: neither a process we saw nor anything whose command line
    or environment names the work dir. Processes that exit by themselves once their parent is gone
    (Flower's --parent-pid monitor polls every 0.2 s) get ``wait`` seconds to do so."""
    deadline = time.monotonic() + wait
    while True:
        left = sorted(pids_with_env(str(work)))
        seen = watch.alive() if watch else []
        if not left and not seen:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of {work} still alive: pids {left}; seen: {seen}")
        time.sleep(0.5)
    if watch is not None:
        assert len(watch.seen) >= 3, watch.seen  # the watch did see the daemons


def run_and_task_ids(state_db: Path) -> tuple[int, int]:
    """(run_id, ServerApp task id) of the only run in a SuperLink database (stored as sint64)."""
    with contextlib.closing(sqlite3.connect(state_db)) as db:
        rows = db.execute("SELECT run_id, primary_task_id FROM run").fetchall()
    assert len(rows) == 1, rows
    return rows[0][0] & (2**64 - 1), rows[0][1] & (2**64 - 1)


def envelope_bytes(run_id: int, task_id: int, node_id: int, reply_to_len: int | None = None
                   ) -> int:
    """Size of the ``Message`` object itself (header + metadata, no content) that
    ``fedlora.wire.message_bytes`` counts with the content, computed by Flower's own ``deflate``.

    It is not content: run, node and task ids are random uint64 (protobuf varints of 9 or 10
    bytes, depending on whether the id is >= 2**63), the header spells the metadata's length in
    decimal (99 vs 128 is one more digit), and ``reply_to_message_id`` is 36 or 64 characters
    (see the constants above). Everything else in the envelope is the same in both paths (src or
    dst = the SuperLink, message type "train", non-zero doubles for created_at and ttl, empty
    group id)."""
    from flwr.app import Message, Metadata, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    if reply_to_len is None:  # instruction: ServerApp → node
        md = Metadata(run_id=run_id, message_id="", src_node_id=SUPERLINK_NODE_ID,
                      dst_node_id=node_id, reply_to_message_id="", group_id="", created_at=1.5,
                      ttl=43200.0, message_type="train", src_task_id=task_id)
    else:  # reply: node → ServerApp
        md = Metadata(run_id=run_id, message_id="", src_node_id=node_id,
                      dst_node_id=SUPERLINK_NODE_ID, reply_to_message_id="0" * reply_to_len,
                      group_id="", created_at=1.5, ttl=43199.5, message_type="train",
                      dst_task_id=task_id)
    return len(Message(metadata=md, content=RecordDict()).deflate())


def content_bytes(rounds: list[dict], run_id: int, task_id: int, msg_id_len: int
                  ) -> dict[tuple[int, str], list[int]]:
    """(round, "down"/"up") → sorted per-message content bytes (measured minus envelope)."""
    out = {}
    for r in rounds[1:]:
        out[(r["round"], "down")] = sorted(
            b - envelope_bytes(run_id, task_id, int(n)) for n, b in r["bytes_down_per_node"].items())
        out[(r["round"], "up")] = sorted(
            b - envelope_bytes(run_id, task_id, int(n), msg_id_len)
            for n, b in r["bytes_up_per_node"].items())
    return out


def assert_complete(rounds: list[dict], clients: int, rounds_n: int = 2) -> None:
    assert [r["round"] for r in rounds] == list(range(rounds_n + 1))
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rounds)
    for r in rounds[1:]:
        assert r["clients"] == clients and r["failures"] == 0 and r["dropped"] == 0, r
        assert len(r["bytes_up_per_node"]) == clients and r["bytes_up"] > 0 and r["bytes_down"] > 0


def logged_node_id(log: str) -> int:
    m = re.search(r"SuperNode ID: (\d+)", log)
    assert m, log[-2000:]
    return int(m.group(1))


# ----------------------------------------------------------------- 1. plain deployment vs sim


@pytest.fixture(scope="module")
def plain(tmp_path_factory, sample_dir):
    out = {}
    work = tmp_path_factory.mktemp("deploy-plain")
    rc = {**BASE, "data-dir": sample_dir, "run-dir": str(work / "runs"), "run-name": "dep"}
    t0 = time.monotonic()
    with Processes(work / "logs") as procs, Watch(procs) as watch:
        dep = Deployment(procs, work, nodes=2, insecure=True).start()
        res = dep.run(rc, timeout=600, log_file=work / "flwr-run.log")
        out["flwr_runs"] = dep.runs()
    out["dep_s"] = time.monotonic() - t0
    log = (work / "flwr-run.log").read_text(errors="replace")
    assert res.returncode == 0, log[-4000:]
    assert_no_orphans(work, watch)
    out["dep"] = read_rounds(work / "runs" / "dep")
    out["dep_ids"] = run_and_task_ids(work / "superlink" / "state.db")

    sim_work = tmp_path_factory.mktemp("deploy-sim")
    t0 = time.monotonic()
    res, run_dir = run_simulation(
        {**rc, "run-dir": str(sim_work / "runs"), "run-name": "sim"}, nodes=2,
        work_dir=sim_work, timeout=600)
    out["sim_s"] = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-4000:]
    assert_no_orphans(sim_work)
    out["sim"] = read_rounds(run_dir)
    out["sim_ids"] = run_and_task_ids(sim_work / "flwr-home" / "state.db")
    return out


def test_deployment_run_completes_with_records(plain):
    assert_complete(plain["dep"], clients=2)
    assert_complete(plain["sim"], clients=2)
    [run] = plain["flwr_runs"]
    assert run["status"] == "finished:completed", run


def test_deployment_bytes_equal_simulation_bytes(plain):
    dep, sim = plain["dep"], plain["sim"]
    # the codec payloads are the same bytes (deterministic local training, same partitions)
    for d, s in zip(dep, sim):
        assert (d["payload_up"], d["payload_down"]) == (s["payload_up"], s["payload_down"])
    # the measured message bytes differ only by the envelope, and exactly by it
    dep_content = content_bytes(dep, *plain["dep_ids"], DEPLOYMENT_MESSAGE_ID_LEN)
    sim_content = content_bytes(sim, *plain["sim_ids"], SIMULATION_MESSAGE_ID_LEN)
    assert dep_content == sim_content, {
        "raw": [(r["round"], r["bytes_down"], r["bytes_up"]) for r in dep + sim],
        "content": (dep_content, sim_content)}
    # raw totals: within the envelope's variable part (28 B of message id per reply, 1 B per
    # shorter varint, 1 B per header digit)
    for d, s in zip(dep[1:], sim[1:]):
        assert abs(d["bytes_down"] - s["bytes_down"]) <= 4 * d["clients"]
        assert abs(d["bytes_up"] - s["bytes_up"]) <= (28 + 4) * d["clients"]


def test_flower_traffic_counter_bounds_measured_bytes(plain):
    """The SuperLink counts the Fleet API bytes of a run itself (``flwr ls``: object contents
    pulled/pushed plus the push/pull request and response protobufs). Our measured bytes must be
    all of the object bytes (no more than Flower's count), with only per-message framing left."""
    [run] = plain["flwr_runs"]
    traffic = run["network-traffic"]
    rounds = plain["dep"][1:]
    n_msgs = sum(r["clients"] for r in rounds)
    down = sum(r["bytes_down"] for r in rounds)
    up = sum(r["bytes_up"] for r in rounds)
    assert 0 <= traffic["outbound-bytes"] - down <= 2048 * n_msgs, (traffic, down)
    assert 0 <= traffic["inbound-bytes"] - up <= 2048 * n_msgs, (traffic, up)


# ------------------------------------------------- 2. the default deployment admits only its own


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (IPv4 and IPv6, from /proc)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, _, hexport = local.rpartition(":")
                if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                    if len(addr) == 8:
                        addr = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                    out.add(addr)
    return out


def outsider_app(path: Path) -> Path:
    """A minimal Flower app of someone else's (``flwr run`` checks its components import)."""
    (path / "other").mkdir(parents=True)
    (path / "other" / "__init__.py").write_text("")
    (path / "other" / "app.py").write_text(
        "from flwr.clientapp import ClientApp\nfrom flwr.serverapp import ServerApp\n\n"
        "server = ServerApp()\nclient = ClientApp()\n")
    (path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "other"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "outsider"\n\n[tool.flwr.app.components]\n'
        'serverapp = "other.app:server"\nclientapp = "other.app:client"\n\n'
        '[tool.flwr.app.config]\n')
    return path


def need_nginx() -> None:
    for tool in ("openssl", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    if nginx_binary() is None:
        if os.environ.get("CI"):  # CI runs as root with Debian's registry: bootstrap installs it
            pytest.fail("nginx missing: scripts/bootstrap.sh (run by ./test) should have "
                        "installed it (apt-get install nginx)")
        pytest.skip("nginx is not installed and scripts/bootstrap.sh could not install it "
                    "(needs root and Debian's registry: apt-get install nginx)")


def test_secure_deployment_admits_only_its_nodes_and_operators(tmp_path, sample_dir):
    """The default Deployment: the SuperLink listens on 127.0.0.1 only, and the one public port
    (the nginx Fleet proxy) serves nothing but Fleet calls. An outsider there, with the CA
    certificate (it is public: every node has it) and a key pair of their own, is refused at
    every step; the operator's CLI on the loopback port registers the nodes and runs 2 rounds."""
    need_nginx()
    work = tmp_path
    rc = {**BASE, "data-dir": sample_dir, "run-dir": str(work / "runs"), "run-name": "secure"}
    with Processes(work / "logs") as procs, Watch(procs) as watch:
        dep = Deployment(procs, work, nodes=2).start()
        registered = set(dep.registered)
        assert len(registered) == 2 and dep.online_node_ids() == registered
        # Flower's one port (Control + Runtime + Fleet) is bound to the loopback only; the
        # nodes came in through the proxy
        assert dep.fleet_address != dep.address
        assert listening_addresses(dep.port) == {"127.0.0.1"}, listening_addresses(dep.port)
        for i in range(2):
            assert f"--superlink {dep.fleet_address}" in " ".join(dep.supernodes[i].args)

        # the outsider: the public address and the CA, as a SuperNode operator would have them,
        # a key pair and an app of their own
        outsider = work / "outsider"
        write_connection(outsider, "public", dep.fleet_address, insecure=False,
                         root_certificates=str(dep.ca))
        app = outsider_app(work / "outsider-app")

        def flwr(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["flwr", *args], env=flower_env(outsider), cwd=app,
                                  capture_output=True, text=True, timeout=180)

        key = dep.make_key("outsider")
        for args in (["supernode", "register", f"{key}.pub", "public"], ["ls", "public"],
                     ["run", str(app), "public"]):
            res = flwr(*args)
            assert res.returncode != 0, (args, res.stdout[-2000:])
            assert "404" in res.stdout + res.stderr, (args, res.stdout[-2000:], res.stderr)
        # control: the same CLI set-up on Flower's own port is let in (which is why that port
        # must stay on the loopback)
        write_connection(outsider, "direct", dep.address, insecure=False,
                         root_certificates=str(dep.ca))
        res = flwr("ls", "direct")
        assert res.returncode == 0, res.stdout[-2000:]
        # the same requests by hand, and the Runtime API (ServerApp <-> SuperLink): not there
        for path in ("/v1/control/register-node", "/v1/control/list-runs",
                     "/v1/control/list-nodes", "/v1/control/start-run", "/v1/runtime/get-nodes",
                     "/v1/fleet/register-node",  # self-registration (Flower refuses it too)
                     "/v1/fleet/..%2f..%2fv1/control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
                     "/health"):
            r = httpx.post(f"https://{dep.fleet_address}{path}", verify=str(dep.ca),
                           content=b"", headers={"content-type": "application/protobuf"})
            assert r.status_code == 404 and "nginx" in r.text, (path, r.status_code, r.text)
        # a Fleet call without a registered node's signature reaches Flower and is refused
        r = httpx.post(f"https://{dep.fleet_address}/v1/fleet/pull-messages", verify=str(dep.ca),
                       content=b"", headers={"content-type": "application/protobuf"})
        assert r.status_code == 401, (r.status_code, r.text)
        # HTTPS only, on both ports
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{dep.address}/health", timeout=5.0)
        r = httpx.post(f"http://{dep.fleet_address}/v1/fleet/pull-messages", timeout=5.0)
        assert r.status_code == 400 and "HTTPS" in r.text, (r.status_code, r.text)
        # nothing of the outsider's made it in
        assert {int(n["node-id"]) for n in dep.node_list()} == registered
        assert dep.runs() == []

        # the operator's run, and meanwhile a SuperNode with the outsider's (unregistered) key
        result: dict = {}
        runner = threading.Thread(target=lambda: result.setdefault(
            "res", dep.run(rc, timeout=600, log_file=work / "flwr-run.log")))
        runner.start()
        intruder = dep.start_supernode(
            9, {"partition-id": 0, "num-partitions": 2}, key, name="intruder")
        deadline = time.monotonic() + 90
        while intruder.poll() is None and time.monotonic() < deadline:
            assert {int(n["node-id"]) for n in dep.node_list()} == registered
            time.sleep(1.0)
        log = procs.log("intruder")
        assert intruder.returncode is not None, "unregistered SuperNode still running after 90 s"
        assert intruder.returncode != 0 and "Failed to activate" in log, log[-2000:]
        assert "SuperNode ID:" not in log
        runner.join(600)
        assert not runner.is_alive()
        res = result["res"]
        assert res.returncode == 0, (work / "flwr-run.log").read_text(errors="replace")[-4000:]
        nodes = dep.node_list()
        runs = dep.runs()
    assert_no_orphans(work, watch)
    assert {int(n["node-id"]) for n in nodes} == registered
    assert [r["status"] for r in runs] == ["finished:completed"], runs
    rounds = read_rounds(work / "runs" / "secure")
    assert_complete(rounds, clients=2, rounds_n=2)
    # with auth, node ids are fixed at registration: the records name exactly those nodes
    for r in rounds[1:]:
        assert {int(n) for n in r["bytes_up_per_node"]} == registered


# -------------------------------------------------------------------- 3. a node dies mid-round


def test_supernode_killed_during_training(tmp_path, sample_dir):
    need_nginx()  # the default (secure) deployment: the nodes go through the Fleet proxy
    work = tmp_path
    rc = {**BASE, "data-dir": sample_dir, "run-dir": str(work / "runs"), "run-name": "fault",
          "max-examples-per-client": 400, "local-epochs": 2, "min-train-nodes": 2,
          "min-available-nodes": 2, "fraction-train": 1.0,
          # a bound, not the mechanism: the SuperLink synthesises the dead node's error reply
          # after 2 missed heartbeats (30 s interval), well before this
          "round-timeout": 240.0}
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    result: dict = {}
    with Processes(work / "logs") as procs, Watch(procs) as watch:
        dep = Deployment(procs, work, node_configs=nodes).start()
        ids = [logged_node_id(procs.log(f"supernode-{i}")) for i in range(3)]
        runner = threading.Thread(target=lambda: result.setdefault(
            "res", dep.run(rc, timeout=600, log_file=work / "flwr-run.log")))
        runner.start()
        victim = dep.supernodes[2]
        deadline = time.monotonic() + 300
        while "Start `flwr-clientapp` process" not in procs.log("supernode-2"):
            assert runner.is_alive() and time.monotonic() < deadline, "round 1 never reached node 2"
            time.sleep(0.2)
        group = [victim.pid, *descendants(victim.pid)]  # SuperNode, its SuperExec, the ClientApp
        assert "Sending: train message" not in procs.log("supernode-2")
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        gone = time.monotonic() + 10  # SIGKILL is delivered at once, dying takes a moment
        while [p for p in group if _start_time(p) is not None] and time.monotonic() < gone:
            time.sleep(0.1)
        assert not [p for p in group if _start_time(p) is not None], group
        runner.join(600)
        assert not runner.is_alive()
    assert_no_orphans(work, watch)
    res = result["res"]
    assert res.returncode == 0, (work / "flwr-run.log").read_text(errors="replace")[-4000:]

    rounds = read_rounds(work / "runs" / "fault")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    r1, r2 = rounds[1], rounds[2]
    victim_id = str(ids[2])
    survivors = {str(i) for i in ids[:2]}
    # round 1: all three were sent the model; the victim's reply is Flower's error reply
    assert set(r1["bytes_down_per_node"]) == survivors | {victim_id}
    assert set(r1["bytes_up_per_node"]) == survivors and r1["clients"] == 2
    assert r1["failures"] == 1, r1
    reason = r1["failure_reasons"][0]["reason"]
    assert "Node Unavailable" in reason and "heartbeat" in reason, reason
    # round 2: only the connected nodes are sampled, and nothing fails
    assert set(r2["bytes_down_per_node"]) == survivors
    assert r2["clients"] == 2 and r2["failures"] == 0, r2


def test_one_hostile_supernode_of_three_cannot_take_over(tmp_path, sample_dir):
    """Three real SuperNodes; the third runs the honest ClientApp wrapped by an attacker
    (tests/hostile_node/sitecustomize.py): every train reply it sends claims 1e15 examples and
    carries the update ×1e4 + 1, in the codec the server asked for. The server caps the weight
    and clips the update every round, the run completes and the federation still learns."""
    work = tmp_path
    rc = {**BASE, "data-dir": sample_dir, "run-dir": str(work / "runs"), "run-name": "hostile",
          "num-server-rounds": 3, "max-examples-per-client": 400, "local-epochs": 2,
          "min-train-nodes": 3, "min-available-nodes": 3, "fraction-train": 1.0}
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    evil = {"PYTHONPATH": str(Path(__file__).parent / "hostile_node"), "FEDLORA_TEST_HOSTILE": "1"}
    with Processes(work / "logs") as procs, Watch(procs) as watch:
        dep = Deployment(procs, work, insecure=True, node_configs=nodes, node_env={2: evil}).start()
        hostile = str(logged_node_id(procs.log("supernode-2")))
        res = dep.run(rc, timeout=600, log_file=work / "flwr-run.log")
    assert_no_orphans(work, watch)
    assert res.returncode == 0, (work / "flwr-run.log").read_text(errors="replace")[-4000:]
    rounds = read_rounds(work / "runs" / "hostile")
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for r in rounds[1:]:
        assert hostile in r["bytes_up_per_node"] and r["clients"] == 3, r
        capped = {str(c["node"]): c for c in r["capped_weights"]}
        assert capped[hostile]["reported"] == 10 ** 15 and capped[hostile]["used"] <= 400
        clipped = {str(c["node"]) for c in r["clipped"]}
        assert clipped == {hostile}, r["clipped"]  # the honest updates pass untouched
    accs = [r["accuracy"] for r in rounds]
    assert accs[-1] > accs[0] + 0.15, accs


# ------------------------------------------------------------------------------------ 4. ports


def test_free_port_never_hands_out_a_port_twice():
    lo, _ = launch._ephemeral_ports()
    ports = [launch.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    if lo - launch._PORT_FLOOR >= 1000:  # below the ephemeral range: no client socket takes it
        assert all(launch._PORT_FLOOR <= p < lo for p in ports), ports


def _offer_first(monkeypatch, offers: list[int | None]) -> None:
    """``free_port`` returns ``offers`` in turn (None: a real free port), then real ones."""
    real = launch.free_port
    queue = list(offers)
    monkeypatch.setattr(launch, "free_port",
                        lambda host="127.0.0.1": (queue.pop(0) if queue else None) or real(host))


def test_daemon_started_again_when_its_port_was_taken(tmp_path, monkeypatch):
    """``free_port`` releases its port before the daemon binds it, so another process may take
    it. The launcher sees "address already in use" in the daemon's log and starts it again on
    another port, keeping the failed attempt's log."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        _offer_first(monkeypatch, [busy])
        with Processes(tmp_path / "logs") as procs:
            proc, port = launch.start_daemon(
                procs, "server", lambda p: [sys.executable, "-u", "-m", "http.server",
                                            "--bind", "127.0.0.1", str(p)],
                os.environ, cwd=tmp_path, ready="Serving HTTP on", timeout=30)
            assert port != busy and proc.poll() is None
            assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
        failed = (tmp_path / "logs" / "server.bind-failed-1.log").read_text()
        assert "Address already in use" in failed, failed


def test_supernode_started_again_when_its_port_was_taken(tmp_path, monkeypatch):
    """The race that gave two SuperNodes one Runtime API port: the second one's port is taken
    before it binds; it is started again on a new port and comes online."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        _offer_first(monkeypatch, [None, None, busy])  # SuperLink, SuperNode 0, SuperNode 1
        with Processes(tmp_path / "logs") as procs, Watch(procs) as watch:
            dep = Deployment(procs, tmp_path, nodes=2, insecure=True).start()
            assert dep.online_nodes() == 2
            ports = [p.args[p.args.index("--port") + 1] for p in dep.supernodes]
            assert busy not in map(int, ports) and len(set(ports)) == 2, ports
            assert all(p.poll() is None for p in dep.supernodes)
        failed = (tmp_path / "logs" / "supernode-1.bind-failed-1.log").read_text()
        assert "address already in use" in failed.lower(), failed
    assert_no_orphans(tmp_path, watch)
