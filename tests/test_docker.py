"""The Docker deployment (docker/), end to end on this machine.

A private ``dockerd`` is started here (its own data/exec root and socket, no bridge, no
iptables) and stopped by its PID afterwards. ``docker/build-offline.sh`` builds the app image
from a debootstrapped Debian base with wheels fetched on the host (``docker build --network
none``); ``docker/compose_run.py`` starts ``docker/compose.yml`` (SuperLink, 2 SuperNodes, their
SuperExecs, all ``--network host``) with the app image standing in for the official
SuperLink/SuperNode images, and the host's ``flwr run . docker --stream`` runs the app. Records
come back through the mounted run directory. The TLS override is run the same way.

Skips, saying why, where dockerd cannot run (not root, no docker.io, dockerd fails to start).
Expensive artifacts are cached in ``~/.cache/fedlora-docker`` (``FEDLORA_DOCKER_CACHE``): the
Debian base tarball, the wheels, and the daemon's data root (image layers), so a second run
only rebuilds the fedlora layers.

The tests without the ``slow`` mark only read the compose files (no daemon).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from fedlora.launch import (PROJECT, Processes, flower_env, flwr_run, free_port,
                            pids_with_env, wait_http, write_connection)
from fedlora.results import read_rounds

DOCKER_DIR = PROJECT / "docker"
sys.path.insert(0, str(DOCKER_DIR))
import compose_run  # noqa: E402

CACHE = Path(os.environ.get("FEDLORA_DOCKER_CACHE",
                            Path.home() / ".cache" / "fedlora-docker")).expanduser()
IMAGE = "fedlora-app:latest"
BASE = {
    "num-server-rounds": 2, "feature-maps": 16, "lora-rank": 8, "local-epochs": 1,
    "max-examples-per-client": 64, "batch-size": 32, "fraction-train": 1.0,
    "dataset": "npz", "partitioner": "iid",
}
COMPOSE = DOCKER_DIR / "compose.yml"
TLS = DOCKER_DIR / "compose.tls.yml"
INSECURE = DOCKER_DIR / "compose.insecure.yml"
PROXY = DOCKER_DIR / "compose.proxy.yml"
GPU = DOCKER_DIR / "compose.gpu.yml"
EDGE = DOCKER_DIR / "compose.edge.yml"
NODE_IMAGE = "fedlora-node:vision"


# ------------------------------------------------------------------ compose files (no daemon)


def _env(**kw: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("FEDLORA_", "FLWR_"))},
            **kw}


def test_compose_services_host_network_and_node_configs():
    model = compose_run.load([COMPOSE], _env(FEDLORA_SUPERLINK_PORT="1234",
                                             FEDLORA_IMAGE="x:1", FLWR_SUPERNODE_IMAGE="y:2"))
    s = model["services"]
    assert set(s) == {"superlink", "superexec-serverapp", "supernode-0", "supernode-1",
                      "superexec-clientapp-0", "superexec-clientapp-1"}
    assert all(v["network_mode"] == "host" for v in s.values())
    assert s["superlink"]["image"] == "flwr/superlink:1.41.0"
    assert s["supernode-0"]["image"] == "y:2" and s["superexec-clientapp-1"]["image"] == "x:1"
    assert "--isolation" in s["superlink"]["command"] and "process" in s["superlink"]["command"]
    for i in (0, 1):
        cmd = s[f"supernode-{i}"]["command"]
        assert cmd[cmd.index("--isolation") + 1] == "process"
        assert cmd[cmd.index("--superlink") + 1] == "127.0.0.1:1234"
        assert cmd[cmd.index("--node-config") + 1] == \
            f'partition-id={i} num-partitions=2 data-dir="/data"'
        port = cmd[cmd.index("--port") + 1]
        se = s[f"superexec-clientapp-{i}"]["command"]
        assert se == ["--insecure", "--runtime-api-address", f"127.0.0.1:{port}"]
    assert s["supernode-0"]["command"] != s["supernode-1"]["command"]
    assert s["superexec-serverapp"]["command"][-1] == "127.0.0.1:1234"
    args = compose_run.run_args("p", "superexec-serverapp", s["superexec-serverapp"],
                                model["project_dir"])
    assert args[args.index("--network") + 1] == "host"
    assert f"{(PROJECT / 'runs').resolve()}:/runs" in args        # relative to docker/


def test_compose_tls_and_gpu_overrides():
    model = compose_run.load([COMPOSE, TLS, GPU], _env(FEDLORA_CERTS_DIR="/c"))
    s = model["services"]
    # secure by default: TLS, node auth, the SuperLink (Control API) on the loopback only
    sl = s["superlink"]["command"]
    assert "--insecure" not in sl and "--ssl-certfile" in sl and "--enable-supernode-auth" in sl
    assert sl[sl.index("--host") + 1] == "127.0.0.1"
    for name in ("superlink", "superexec-serverapp", "supernode-0", "supernode-1"):
        assert "/c/ca.crt:/certs/ca.crt:ro" in s[name]["volumes"], name
    for name in ("superexec-serverapp", "supernode-0", "supernode-1"):
        assert "--root-certificates" in s[name]["command"], name
        assert not any("server.key" in v or "ca.key" in v for v in s[name]["volumes"]), name
    for i in (0, 1):
        cmd = s[f"supernode-{i}"]["command"]
        assert cmd[cmd.index("--auth-supernode-private-key") + 1] == f"/certs/supernode-{i}"
        assert f"/c/supernode-{i}:/certs/supernode-{i}:ro" in s[f"supernode-{i}"]["volumes"]
    # plain HTTP only with the explicit override; the proxy adds one service, nothing else
    ins = compose_run.load([COMPOSE, INSECURE], _env())["services"]
    assert "--insecure" in ins["superlink"]["command"]
    assert "--enable-supernode-auth" not in ins["superlink"]["command"]
    px = compose_run.load([COMPOSE, PROXY], _env())["services"]
    assert set(px) - set(s) == {"fleet-proxy"}
    # the ServerApp's SuperExec keeps its data and run volumes under the override
    assert any(v.endswith(":/runs") for v in s["superexec-serverapp"]["volumes"])
    args = compose_run.run_args("p", "superexec-clientapp-0", s["superexec-clientapp-0"],
                                model["project_dir"])
    assert args[args.index("--gpus") + 1] == "1" and "fedlora-app:gpu" in args
    # a service on a Docker network is refused, not run
    with pytest.raises(compose_run.ComposeError, match="network_mode: host"):
        compose_run.load([_write_tmp("services:\n  a:\n    image: x\n")], _env())


SUPERLINK_HOST = DOCKER_DIR / "compose.superlink-host.yml"
NODE_HOST = DOCKER_DIR / "compose.node-host.yml"


def test_compose_multihost_files():
    """The two files for separate machines: the SuperLink host serves Control on 127.0.0.1
    only (TLS, node authentication) and the nodes' network through the Fleet proxy; its
    ServerApp gets the evaluation data and the run folder. A node host's SuperNode dials the
    given proxy address with ca.crt and its own key only (no server or CA key), and the file
    refuses to start without the address, partition-id and num-partitions."""
    s = compose_run.load([SUPERLINK_HOST], _env(FEDLORA_CERTS_DIR="/c",
                                                FEDLORA_EVAL_DIR="/e"))["services"]
    assert set(s) == {"superlink", "superexec-serverapp", "fleet-proxy"}
    assert all(v["network_mode"] == "host" for v in s.values())
    sl = s["superlink"]["command"]
    assert sl[sl.index("--host") + 1] == "127.0.0.1" and "--enable-supernode-auth" in sl
    assert "--insecure" not in sl
    assert "/e:/data:ro" in s["superexec-serverapp"]["volumes"]
    assert any(v.endswith(":/runs") for v in s["superexec-serverapp"]["volumes"])
    assert "/c/fleet-proxy.conf:/etc/fedlora/nginx.conf:ro" in s["fleet-proxy"]["volumes"]
    n = compose_run.load([NODE_HOST], _env(
        FEDLORA_SUPERLINK="10.0.0.1:9443", FEDLORA_PARTITION_ID="1",
        FEDLORA_NUM_PARTITIONS="3", FEDLORA_NODE_DIR="/n", FEDLORA_DATA_DIR="/d"))["services"]
    assert set(n) == {"supernode", "superexec-clientapp"}
    cmd = n["supernode"]["command"]
    assert cmd[cmd.index("--superlink") + 1] == "10.0.0.1:9443"
    assert cmd[cmd.index("--node-config") + 1] == 'partition-id=1 num-partitions=3 data-dir="/data"'
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert sorted(n["supernode"]["volumes"]) == ["/n/ca.crt:/certs/ca.crt:ro",
                                                 "/n/supernode-key:/certs/supernode-key:ro"]
    port = cmd[cmd.index("--port") + 1]
    assert n["superexec-clientapp"]["command"] == [
        "--insecure", "--runtime-api-address", f"127.0.0.1:{port}"]
    assert "/d:/data:ro" in n["superexec-clientapp"]["volumes"]
    with pytest.raises(compose_run.ComposeError, match="Fleet proxy"):
        compose_run.load([NODE_HOST], _env(FEDLORA_PARTITION_ID="0",
                                           FEDLORA_NUM_PARTITIONS="2"))


def test_compose_edge_override_changes_only_the_clientapp_images():
    """compose.edge.yml puts the slim node image under each ClientApp SuperExec and changes
    nothing else (the SuperLink and the ServerApp's SuperExec keep the full image)."""
    base = compose_run.load([COMPOSE, INSECURE], _env(FEDLORA_IMAGE="full:1"))["services"]
    edge = compose_run.load([COMPOSE, INSECURE, EDGE], _env(FEDLORA_IMAGE="full:1"))["services"]
    assert set(edge) == set(base)
    for name, svc in edge.items():
        if name.startswith("superexec-clientapp-"):
            assert svc["image"] == NODE_IMAGE
            assert {**svc, "image": "full:1"} == base[name]
        else:
            assert svc == base[name], name
    custom = compose_run.load([COMPOSE, EDGE], _env(FEDLORA_NODE_IMAGE="n:2"))["services"]
    assert custom["superexec-clientapp-1"]["image"] == "n:2"


def _write_tmp(text: str) -> Path:
    f = Path(tempfile.mkdtemp(prefix="fedlora-compose-")) / "compose.yml"
    f.write_text(text)
    return f


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose not installed")
def test_compose_run_reads_files_like_docker_compose():
    """Cross-check of compose_run's merge/interpolation against Compose itself."""
    import yaml

    env = _env(FEDLORA_SUPERLINK_PORT="4321", FEDLORA_DATA_DIR="/d", FEDLORA_CERTS_DIR="/c")
    files = [COMPOSE, TLS]
    args = ["docker-compose"] + [a for f in files for a in ("-f", str(f))] + ["config"]
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    theirs = yaml.safe_load(res.stdout)["services"]
    ours = compose_run.load(files, env)["services"]
    assert set(theirs) == set(ours)
    for name, svc in ours.items():
        t = theirs[name]
        assert [str(x) for x in t["command"]] == svc["command"], name
        assert t["image"] == svc["image"] and t["network_mode"] == "host", name
        assert sorted(t.get("volumes", [])) == sorted(
            compose_run._volume_arg(v, COMPOSE.parent) + ("" if v.count(":") > 1 else ":rw")
            for v in svc.get("volumes", [])), name


# --------------------------------------------------------------------------- docker engine


class Engine:
    """A private dockerd, started and stopped (by PID) here."""

    def __init__(self, work: Path) -> None:
        self.work = work
        # a short exec root: unix socket paths are limited to 108 bytes
        self.exec_root = Path(tempfile.mkdtemp(prefix="fdk-", dir="/tmp"))
        self.sock = self.exec_root / "docker.sock"
        self.procs = Processes(work / "logs")
        self.proc: subprocess.Popen | None = None
        self._lock = None
        # the data root (image layers) is cached, unless another run holds it
        CACHE.mkdir(parents=True, exist_ok=True)
        self.data_root = CACHE / "docker-data"
        lock = open(CACHE / "docker-data.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock = lock
        except OSError:
            lock.close()
            self.data_root = work / "docker-data"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "0"}

    def start(self) -> str | None:
        """Start dockerd; returns why it could not run (None when it runs)."""
        if os.geteuid() != 0:
            return "dockerd needs root (this test starts its own daemon)"
        tools = subprocess.run(["bash", str(DOCKER_DIR / "build-offline.sh"), "--tools-only"],
                               capture_output=True, text=True, timeout=900)
        if not shutil.which("dockerd") or not shutil.which("docker"):
            return ("dockerd/docker not installed and `apt-get install docker.io` failed: "
                    + (tools.stderr or tools.stdout)[-500:])
        cfg = self.exec_root / "daemon.json"
        cfg.write_text("{}")   # not /etc/docker/daemon.json: nothing of the host's setup
        cmd = ["dockerd", "--config-file", str(cfg), "--data-root", str(self.data_root),
               "--exec-root", str(self.exec_root), "-H", f"unix://{self.sock}",
               "--pidfile", str(self.exec_root / "docker.pid"),
               "--bridge=none", "--iptables=false", "--ip-masq=false"]
        self.proc = self.procs.start("dockerd", cmd, os.environ)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return (f"dockerd exited with {self.proc.returncode}: "
                        + self.procs.log("dockerd")[-1500:])
            if self.sock.exists() and self.docker(["version"], check=False).returncode == 0:
                # a container left by an interrupted run in the cached data root
                ids = self.docker(["ps", "-aq"]).stdout.split()
                if ids:
                    self.docker(["rm", "-f", *ids], check=False)
                return None
            time.sleep(0.5)
        return "dockerd did not answer within 90 s: " + self.procs.log("dockerd")[-1500:]

    def docker(self, args: list[str], check: bool = True, timeout: float = 300
               ) -> subprocess.CompletedProcess:
        res = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {res.stderr[-2000:]}")
        return res

    def leftovers(self) -> set[int]:
        """Processes of this engine: dockerd, its containerd and shims (their command lines
        name the exec root)."""
        return pids_with_env(str(self.exec_root))

    def mounts(self) -> list[str]:
        """Mount points under the exec root or the data root (ours alone)."""
        roots = (str(self.exec_root) + "/", str(self.data_root) + "/")
        with open("/proc/self/mounts") as f:
            points = [line.split()[1].replace("\\040", " ") for line in f]
        return [p for p in points if p.startswith(roots)]

    def stop(self) -> None:
        """Remove every container of this (private) daemon, stop dockerd by its PID (SIGTERM,
        then whatever is left of its process group and descendants), release the cache."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.docker(["ps", "-aq"], timeout=60).stdout.split()
                if ids:
                    self.docker(["rm", "-f", *ids], check=False, timeout=120)
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        self.procs.__exit__(None, None, None)
        for pid in self.leftovers():      # only ever ours: they name our exec root
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # dockerd leaves its default network namespace bind-mounted at <exec-root>/netns/default
        for mnt in sorted(self.mounts(), reverse=True):
            subprocess.run(["umount", mnt], capture_output=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine(tmp_path_factory.mktemp("docker-engine"))
    try:
        why = eng.start()
        if why:
            pytest.skip(f"cannot run dockerd here: {why}")
        yield eng
    finally:
        eng.stop()
        left, mounts = eng.leftovers(), eng.mounts()
        if not mounts:
            shutil.rmtree(eng.exec_root, ignore_errors=True)
        assert not left, f"processes of the docker engine survived: {left}"
        assert not mounts, f"mounts of the docker engine left: {mounts}"


@pytest.fixture(scope="module")
def app_image(engine):
    """The app image, built by docker/build-offline.sh (cached pieces reused)."""
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(DOCKER_DIR / "build-offline.sh"), "--install-tools"],
                         env={**engine.env, "FEDLORA_IMAGE": IMAGE,
                              "FEDLORA_DOCKER_CACHE": str(CACHE)},
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    size = int(engine.docker(["image", "inspect", "-f", "{{.Size}}", IMAGE]).stdout)
    print(f"\n[test_docker] image {IMAGE}: {size / 1e9:.2f} GB, "
          f"build {time.monotonic() - t0:.0f} s", flush=True)
    return IMAGE


@pytest.fixture(scope="module")
def node_image(engine, app_image):
    """The slim vision node image (FEDLORA_VARIANT=node-vision), from the same fetched wheels."""
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(DOCKER_DIR / "build-offline.sh")],
                         env={**engine.env, "FEDLORA_VARIANT": "node-vision",
                              "FEDLORA_IMAGE": NODE_IMAGE, "FEDLORA_DOCKER_CACHE": str(CACHE)},
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    size = int(engine.docker(["image", "inspect", "-f", "{{.Size}}", NODE_IMAGE]).stdout)
    print(f"\n[test_docker] image {NODE_IMAGE}: {size / 1e9:.2f} GB, "
          f"build {time.monotonic() - t0:.0f} s", flush=True)
    return NODE_IMAGE


@contextlib.contextmanager
def deployment(engine: Engine, work: Path, files: list[Path], extra_env: dict[str, str]):
    """compose_run up (app image standing in for SuperLink/SuperNode), yields (env, logs);
    always down; then no container and no process of it may be left."""
    project = "fl" + uuid.uuid4().hex[:8]
    tag = f"fedlora-docker-{project}"
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    runs.chmod(0o777)   # the containers run as uid 49999
    env = {**engine.env, "FEDLORA_IMAGE": IMAGE, "FLWR_SUPERLINK_IMAGE": IMAGE,
           "FLWR_SUPERNODE_IMAGE": IMAGE, "FEDLORA_SUPERLINK_PORT": str(free_port()),
           "FEDLORA_SUPERNODE_0_PORT": str(free_port()),
           "FEDLORA_SUPERNODE_1_PORT": str(free_port()),
           "FEDLORA_DATA_DIR": str(PROJECT / "tests" / "data" / "fashion-mnist-sample"),
           "FEDLORA_RUNS_DIR": str(runs), "FEDLORA_RUN_TAG": tag,
           "COMPOSE_PROJECT_NAME": project, **extra_env}
    driver = [sys.executable, str(DOCKER_DIR / "compose_run.py")] + \
        [a for f in files for a in ("-f", str(f))]

    def logs() -> str:
        r = subprocess.run(driver + ["logs"], env=env, capture_output=True, text=True,
                           timeout=120)
        return r.stdout[-6000:] + r.stderr[-2000:]

    try:
        up = subprocess.run(driver + ["up"], env=env, capture_output=True, text=True,
                            timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        yield env, logs
    finally:
        subprocess.run(driver + ["down"], env=env, capture_output=True, text=True, timeout=300)
    left = engine.docker(["ps", "-aq", "--filter",
                          f"label=com.docker.compose.project={project}"]).stdout.split()
    assert not left, f"containers left: {left}"
    deadline = time.monotonic() + 30
    while pids_with_env(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pids_with_env(tag), "a process of the deployment's containers is still alive"


def _wait_nodes(cli_home: Path, connection: str, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        res = subprocess.run(["flwr", "supernode", "list", connection, "--format", "json"],
                             env=flower_env(cli_home), cwd=PROJECT, capture_output=True,
                             text=True, timeout=120)
        last = res.stdout + res.stderr
        with contextlib.suppress(ValueError, AttributeError):
            nodes = json.loads(res.stdout).get("nodes", [])
            if sum(str(x.get("status")).lower() == "online" for x in nodes) >= n:
                return
        time.sleep(2)
    raise TimeoutError(f"fewer than {n} SuperNodes online after {timeout:.0f}s: {last[-800:]}")


def _run_and_check(engine, work: Path, files: list[Path], rounds: int, tls: bool,
                   extra_env: dict[str, str] | None = None) -> None:
    certs = work / "certs"
    extra = dict(extra_env or {})
    if tls:  # node keys too, handed to uid 49999 (the daemons' user in the images), still 0600
        subprocess.run(["bash", str(PROJECT / "scripts" / "make-certs.sh"), str(certs),
                        "localhost", "127.0.0.1"], check=True, capture_output=True,
                       env={**os.environ, "NODE_KEYS": "2", "KEY_OWNER": "49999"})
        extra["FEDLORA_CERTS_DIR"] = str(certs)
    with deployment(engine, work, files, extra) as (env, logs):
        port = env["FEDLORA_SUPERLINK_PORT"]
        address = f"127.0.0.1:{port}"
        cli_home = work / "cli"
        if tls:
            wait_http(f"https://{address}/health", timeout=180,
                      verify=ssl.create_default_context(cafile=str(certs / "ca.crt")))
            write_connection(cli_home, "docker", address, insecure=False,
                             root_certificates=str(certs / "ca.crt"))
            for i in (0, 1):  # the SuperNodes are restarted until their keys are registered
                reg = subprocess.run(["flwr", "supernode", "register",
                                      str(certs / f"supernode-{i}.pub"), "docker"],
                                     env=flower_env(cli_home), cwd=PROJECT, capture_output=True,
                                     text=True, timeout=120)
                assert reg.returncode == 0, reg.stdout + reg.stderr
        else:
            wait_http(f"http://{address}/health", timeout=180)
            write_connection(cli_home, "docker", address)
        try:
            _wait_nodes(cli_home, "docker", 2)
        except TimeoutError as e:
            pytest.fail(f"{e}\n{logs()}")
        name = f"docker-{'tls' if tls else 'plain'}"
        rc = {**BASE, "num-server-rounds": rounds, "data-dir": "/data", "run-dir": "/runs",
              "run-name": name}
        t0 = time.monotonic()
        res = flwr_run(PROJECT, "docker", cli_home, rc, timeout=900)
        print(f"\n[test_docker] {name}: {rounds} rounds in {time.monotonic() - t0:.0f} s",
              flush=True)
        assert res.returncode == 0, res.stdout[-4000:] + "\n" + logs()
    run_dir = work / "runs" / name
    recs = read_rounds(run_dir)
    assert [r["round"] for r in recs] == list(range(rounds + 1)), recs
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in recs)
    assert all(r["clients"] == 2 and r["failures"] == 0 for r in recs[1:]), recs
    assert (run_dir / "summary.json").exists()
    assert json.loads((run_dir / "summary.json").read_text())["run_dir"] == f"/runs/{name}"


@pytest.mark.slow
def test_compose_deployment_two_rounds(engine, app_image, tmp_path):
    _run_and_check(engine, tmp_path, [COMPOSE, INSECURE], rounds=2, tls=False)


@pytest.mark.slow
def test_compose_deployment_tls(engine, app_image, tmp_path):
    _run_and_check(engine, tmp_path, [COMPOSE], rounds=1, tls=True)


@contextlib.contextmanager
def _private_address():
    """A private /32 address on an interface of its own (a dummy one, or where the kernel has
    no dummy driver one end of a veth pair), removed afterwards: a non-loopback address for
    the SuperLink host's Fleet proxy, reachable by the node hosts' containers (all on the host
    network) and by nothing beyond this host (no route, no peer outside it)."""
    name = f"fl39d{os.getpid() % 100000}"
    address = f"10.39.{200 + os.getpid() % 50}.1"
    add = subprocess.run(["ip", "link", "add", name, "type", "dummy"], capture_output=True,
                         text=True)
    links = [name]
    if add.returncode != 0:
        add = subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name",
                              name + "p"], capture_output=True, text=True)
        links = [name, name + "p"]
    if add.returncode != 0:
        pytest.skip(f"cannot add a dummy or veth interface: {add.stderr.strip()}")
    try:
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", name], check=True,
                       capture_output=True)
        for link in links:
            subprocess.run(["ip", "link", "set", link, "up"], check=True, capture_output=True)
        yield address
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)  # a veth's peer too


@pytest.mark.slow
def test_compose_superlink_host_and_node_hosts(engine, app_image, tmp_path):
    """compose.superlink-host.yml and two projects of compose.node-host.yml (as on separate
    machines), against each other over a non-loopback address: the Fleet proxy listens on a
    private 10.39.x.1 on an interface of its own, which the certificate names; each node host gets only ca.crt
    and its own key; the SuperLink host's ServerApp gets an evaluation folder holding only
    test.npz. The operator registers both keys on the loopback port, the run completes and
    the records name exactly the registered nodes.

    No image registry here: the app image stands in for the SuperLink/SuperNode images, and
    for nginx:1.27 the host's Debian nginx binary is mounted into the app image (same Debian
    release), run as root like the official image's master process."""
    nginx = launch_nginx()
    if nginx is None:
        pytest.skip("nginx not installed on the host (scripts/bootstrap.sh installs it)")
    with _private_address() as address:
        certs, evaluation = tmp_path / "certs", tmp_path / "eval"
        evaluation.mkdir()
        shutil.copy(PROJECT / "tests" / "data" / "fashion-mnist-sample" / "test.npz", evaluation)
        subprocess.run(["bash", str(PROJECT / "scripts" / "make-certs.sh"), str(certs),
                        address], check=True, capture_output=True,
                       env={**os.environ, "NODE_KEYS": "2", "KEY_OWNER": "49999",
                            "RSA_BITS": "2048"})
        fleet_port, superlink_port = free_port(), free_port()
        conf = subprocess.run(
            [sys.executable, "-m", "fedlora.launch", "fleet-proxy-conf", "--listen",
             f"{address}:{fleet_port}", "--superlink", f"127.0.0.1:{superlink_port}",
             "--certs", "/certs", "--state-dir", "/tmp"], capture_output=True, text=True,
            check=True, cwd=PROJECT)
        (certs / "fleet-proxy.conf").write_text(conf.stdout)
        proxy = tmp_path / "proxy-here.yml"
        proxy.write_text(
            "services:\n  fleet-proxy:\n    image: " + IMAGE + "\n    user: \"0:0\"\n"
            "    entrypoint: [/usr/sbin/nginx]\n    volumes:\n"
            f"      - {nginx}:/usr/sbin/nginx:ro\n")
        nodes = {}
        for i in (0, 1):
            d = tmp_path / f"node-{i}"
            d.mkdir()
            shutil.copy(certs / "ca.crt", d / "ca.crt")
            shutil.copy2(certs / f"supernode-{i}", d / "supernode-key")
            os.chown(d / "supernode-key", 49999, -1)
            nodes[i] = d
        with contextlib.ExitStack() as stack:
            env, logs_a = stack.enter_context(deployment(
                engine, tmp_path / "a", [SUPERLINK_HOST, proxy],
                {"FEDLORA_CERTS_DIR": str(certs), "FEDLORA_EVAL_DIR": str(evaluation),
                 "FEDLORA_SUPERLINK_PORT": str(superlink_port)}))
            local = f"127.0.0.1:{superlink_port}"
            wait_http(f"https://{local}/health", timeout=180,
                      verify=ssl.create_default_context(cafile=str(certs / "ca.crt")))
            cli_home = tmp_path / "cli"
            write_connection(cli_home, "cluster", local, insecure=False,
                             root_certificates=str(certs / "ca.crt"))
            ids = set()
            for i in (0, 1):
                reg = subprocess.run(["flwr", "supernode", "register",
                                      str(certs / f"supernode-{i}.pub"), "cluster"],
                                     env=flower_env(cli_home), cwd=PROJECT, capture_output=True,
                                     text=True, timeout=120)
                assert reg.returncode == 0, reg.stdout + reg.stderr
                ids.add(int(re.search(r"SuperNode (\d+) registered", reg.stdout).group(1)))
            logs = [logs_a]
            for i, d in nodes.items():
                _, logs_n = stack.enter_context(deployment(
                    engine, tmp_path / f"b{i}", [NODE_HOST],
                    {"FEDLORA_SUPERLINK": f"{address}:{fleet_port}",
                     "FEDLORA_PARTITION_ID": str(i), "FEDLORA_NUM_PARTITIONS": "2",
                     "FEDLORA_NODE_DIR": str(d), "FEDLORA_SUPERNODE_PORT": str(free_port()),
                     "FEDLORA_DATA_DIR": str(PROJECT / "tests" / "data" /
                                             "fashion-mnist-sample")}))
                logs.append(logs_n)
            try:
                _wait_nodes(cli_home, "cluster", 2)
            except TimeoutError as e:
                pytest.fail(f"{e}\n" + "\n".join(f() for f in logs))
            rc = {**BASE, "num-server-rounds": 1, "data-dir": "/data", "run-dir": "/runs",
                  "run-name": "multihost"}
            res = flwr_run(PROJECT, "cluster", cli_home, rc, timeout=900)
            assert res.returncode == 0, res.stdout[-4000:] + "\n" + logs_a()
            status = subprocess.run(["flwr", "ls", "cluster", "--format", "json"],
                                    env=flower_env(cli_home), cwd=PROJECT, capture_output=True,
                                    text=True, timeout=120)
            assert [r["status"] for r in json.loads(status.stdout)["runs"]] == \
                ["finished:completed"], status.stdout
    recs = read_rounds(tmp_path / "a" / "runs" / "multihost")
    assert [r["round"] for r in recs] == [0, 1]
    assert recs[1]["clients"] == 2 and recs[1]["failures"] == 0
    assert {int(n) for n in recs[1]["bytes_up_per_node"]} == ids


def launch_nginx() -> str | None:
    from fedlora.launch import nginx_binary

    return nginx_binary()


@pytest.mark.slow
def test_compose_deployment_edge_vision_nodes(engine, app_image, node_image, tmp_path):
    """The slim vision node image as both SuperNode daemons and both ClientApp SuperExecs
    (compose.edge.yml): a real round trains on nodes without transformers/peft/datasets."""
    _run_and_check(engine, tmp_path, [COMPOSE, INSECURE, EDGE], rounds=1, tls=False,
                   extra_env={"FEDLORA_NODE_IMAGE": node_image,
                              "FLWR_SUPERNODE_IMAGE": node_image})


@pytest.mark.slow
def test_node_image_is_smaller_and_starts(engine, app_image, node_image):
    """Size and cold start of both images (benchmarks/images.py); the slim one is smaller and
    holds none of the text stack. FEDLORA_IMAGES_OUT=<folder> writes the measurement there."""
    sys.path.insert(0, str(PROJECT))
    from benchmarks import images

    rows = images.measure([app_image, node_image], run=lambda a: engine.docker(a, check=False))
    full, node = rows
    print("\n" + images.table(rows), flush=True)
    assert node["size_mb"] < full["size_mb"]
    assert not {"transformers", "peft", "datasets", "pyarrow", "pandas", "scipy"} & \
        set(node["holds"]), node["holds"]
    assert {"transformers", "peft"} <= set(full["holds"])
    assert node["examples"] == full["examples"] > 0   # the same partition, with or without datasets
    if os.environ.get("FEDLORA_IMAGES_OUT"):
        images.write(rows, Path(os.environ["FEDLORA_IMAGES_OUT"]),
                     command="FEDLORA_IMAGES_OUT=<folder> pytest tests/test_docker.py -k "
                             "'smaller' (it builds both images first)",
                     note=f"measured by tests/test_docker.py on its private dockerd; load "
                          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


@pytest.mark.slow
def test_engine_stops_by_pid(engine):
    """Last: the daemon goes away by its PID and leaves no process (the fixture re-checks)."""
    engine.stop()
    assert engine.proc.returncode is not None      # reaped: dockerd has exited
    assert not engine.leftovers()
    assert not engine.mounts()
