"""Start and stop real Flower processes for a run, by PID, even on failure.

Used by ``./run``, the tests and the benchmarks. A simulation run here is the same code path as
``flwr run .``: a ``flower-superlink --simulation`` (started by us, so we know its PID instead of
leaving Flower's detached managed SuperLink behind), a connection in ``$FLWR_HOME/config.toml``,
and ``flwr run <app> <connection> --stream``.

    python -m fedlora.launch sim --nodes 4 -- num-server-rounds=3 method="flocora"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import httpx

PROJECT = Path(__file__).resolve().parent.parent


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        "HF_DATASETS_OFFLINE": env.get("HF_DATASETS_OFFLINE", "1"),
        "RAY_DEDUP_LOGS": "0",
        "PYTHONUNBUFFERED": "1",
    })
    bindir = str(Path(sys.executable).parent)
    if not env.get("PATH", "").startswith(bindir):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def config_string(values: Mapping[str, Any]) -> str:
    """``{"a": 1, "b": "x"}`` → ``a=1 b="x"`` (Flower's --run-config / --node-config syntax)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def write_connection(flwr_home: Path, name: str, address: str, insecure: bool = True,
                     root_certificates: str | None = None) -> None:
    """Add ``[superlink.<name>]`` to ``$FLWR_HOME/config.toml``, replacing a table of that name
    left by an earlier run in the same ``FLWR_HOME`` (TOML forbids declaring it twice, and the
    flwr CLI then refuses the whole file)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    text = path.read_text() if path.exists() else ""
    header = re.compile(r"^\s*\[")
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        if header.match(line):
            skipping = line.strip() in (f"[superlink.{name}]", f'[superlink."{name}"]')
        if not skipping:
            kept.append(line)
    text = "".join(kept).rstrip("\n")
    # drop an earlier table of the same name (a reused FLWR_HOME): TOML forbids duplicates
    kept, skipping = [], False
    for line in text.splitlines():
        header = line.strip().startswith("[")
        if header:
            skipping = line.strip() == f"[superlink.{name}]"
        if not skipping:
            kept.append(line)
    text = "\n".join(kept).rstrip() + "\n" if kept else ""
    lines = [f"\n[superlink.{name}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    if root_certificates:
        lines.append(f'root-certificates = "{root_certificates}"')
    path.write_text(text + "\n".join(lines) + "\n")


class Processes(contextlib.AbstractContextManager):
    """Every process started through here is stopped (its whole process group, by PID) on
    exit, whatever happened."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path | None = None
              ) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM the process, its group and every descendant (Flower's SuperExec starts its
        own session, and Ray's daemons live in that one); SIGKILL whatever is left."""
        family = [proc.pid, *descendants(proc.pid)]
        for pid in family:
            _signal_group_and_pid(pid, signal.SIGTERM)
        # the process's own group (start_new_session: pgid == pid) also when the process has
        # already exited: what it started in its group (a SuperNode's SuperExec, a script's
        # background daemons) lives on, reparented, and is no longer among its descendants
        _signal_own_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in family):
            time.sleep(0.2)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0)
        for pid in family:
            _signal_group_and_pid(pid, signal.SIGKILL)
        _signal_own_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def __exit__(self, *exc) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()

    def log(self, name: str) -> str:
        p = self.log_dir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pids_with_env(marker: str) -> set[int]:
    """Live processes whose command line or environment mentions ``marker`` (e.g. a run's work
    dir, which is in the FLWR_HOME every process of that run inherits, Ray's daemons too)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            if marker.encode() in blob and _alive(int(entry.name)):
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


def _signal_own_group(proc: subprocess.Popen, sig: int) -> None:
    """killpg the group ``proc`` leads (started with start_new_session), also after ``proc``
    exited. Safe: while the group has members its id cannot be given to a new process; once it
    is empty the id can, so nothing is sent when a live process has that PID and ``proc`` (already
    reaped by Popen) is not it."""
    if proc.poll() is not None and Path(f"/proc/{proc.pid}").exists():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _signal_group_and_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None,
              verify: Any = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} came up")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0, verify=verify).is_success:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout:.0f}s")


def start_sim_superlink(procs: Processes, flwr_home: Path, port: int | None = None,
                        name: str = "sim") -> str:
    """A simulation SuperLink on 127.0.0.1 and a connection ``name`` to it."""
    port = port or free_port()
    env = flower_env(flwr_home)
    proc = procs.start("superlink", [
        "flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
        "--port", str(port), "--database", str(flwr_home / "state.db"),
        "--disable-runtime-dependency-installation"], env, cwd=flwr_home)
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    write_connection(flwr_home, name, f"127.0.0.1:{port}")
    return name


def flwr_run(app: Path, connection: str, flwr_home: Path, run_config: Mapping[str, Any],
             federation_config: Mapping[str, Any] | None = None, timeout: float = 1800,
             log_file: Path | None = None, stream: bool = False) -> subprocess.CompletedProcess:
    """``flwr run <app> <connection> --stream`` with the given overrides; returns when the run
    has finished (or raises TimeoutExpired). Output is captured, written to ``log_file``, or
    (``stream``) left on this process's terminal."""
    cmd = ["flwr", "run", str(app), connection, "--stream"]
    if run_config:
        cmd += ["--run-config", config_string(run_config)]
    if federation_config:
        cmd += ["--federation-config", config_string(federation_config)]
    out = open(log_file, "w") if log_file else (None if stream else subprocess.PIPE)
    try:
        return subprocess.run(cmd, env=flower_env(flwr_home), cwd=app, stdout=out,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    finally:
        if log_file:
            out.close()


def run_simulation(run_config: Mapping[str, Any], nodes: int = 2, work_dir: Path | None = None,
                   cpus_per_node: float = 1, timeout: float = 1800, stream: bool = False,
                   gpus_per_node: float = 0) -> tuple[subprocess.CompletedProcess, Path]:
    """One simulated run end to end; returns (flwr run result, run directory).

    ``gpus_per_node``: Ray GPU share per simulated node (e.g. 0.1 = ten ClientApps per GPU), so
    Ray schedules ClientApps by GPU memory as well as CPUs; with 0 Ray reserves no GPU for them
    (run-config ``device=cpu`` keeps them off any GPU they might still see)."""
    work_dir = Path(work_dir or PROJECT / "runs" / ".flwr").resolve()
    flwr_home = work_dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    rc = dict(run_config)
    rc.setdefault("run-dir", str((work_dir / "runs").resolve()))
    rc.setdefault("run-name", time.strftime("%Y%m%d-%H%M%S"))
    with Processes(work_dir / "logs") as procs:
        conn = start_sim_superlink(procs, flwr_home)
        res = flwr_run(PROJECT, conn, flwr_home, rc,
                       {"num-supernodes": nodes, "client-resources-num-cpus": cpus_per_node,
                        "client-resources-num-gpus": gpus_per_node},
                       timeout=timeout, stream=stream)
    return res, Path(rc["run-dir"]) / rc["run-name"]


# ---------------------------------------------------------------------------------- deployment


class Deployment:
    """A real SuperLink and N SuperNodes on this machine (one ``FLWR_HOME`` each, as if on
    separate hosts), started through a :class:`Processes` that stops them all."""

    def __init__(self, procs: Processes, work_dir: Path, nodes: int = 2, tls: bool = False,
                 auth: bool = False, host: str = "127.0.0.1",
                 node_configs: list[Mapping[str, Any]] | None = None,
                 connection: str = "deployment") -> None:
        self.procs, self.work_dir, self.tls, self.auth = procs, Path(work_dir), tls, auth
        self.host, self.connection = host, connection
        self.port = free_port()
        self.cli_home = self.work_dir / "cli"
        self.certs = self.work_dir / "certs"
        self.node_configs = list(node_configs or [
            {"partition-id": i, "num-partitions": nodes} for i in range(nodes)])
        self.supernodes: list[subprocess.Popen] = []
        self.keys: list[Path] = []
        self.registered: list[int] = []  # node ids fixed by `flwr supernode register`

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _tls_args(self) -> list[str]:
        return ["--root-certificates", str(self.certs / "ca.crt")] if self.tls else ["--insecure"]

    def start_superlink(self) -> subprocess.Popen:
        home = self.work_dir / "superlink"
        home.mkdir(parents=True, exist_ok=True)
        cmd = ["flower-superlink", "--host", self.host, "--port", str(self.port),
               "--database", str(home / "state.db"),
               "--disable-runtime-dependency-installation"]
        if self.tls:
            subprocess.run(["bash", str(PROJECT / "scripts" / "make-certs.sh"), str(self.certs),
                            "localhost", self.host], check=True, capture_output=True)
            cmd += ["--ssl-ca-certfile", str(self.certs / "ca.crt"),
                    "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key")]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        proc = self.procs.start("superlink", cmd, flower_env(home), cwd=home)
        scheme = "https" if self.tls else "http"
        wait_http(f"{scheme}://{self.address}/health", proc=proc,
                  verify=str(self.certs / "ca.crt") if self.tls else True)
        write_connection(self.cli_home, self.connection, self.address, insecure=not self.tls,
                         root_certificates=str(self.certs / "ca.crt") if self.tls else None)
        return proc

    def make_key(self, name: str) -> Path:
        """A fresh ECDSA P-384 key pair ``keys/<name>`` + ``.pub`` (an old pair is replaced;
        ssh-keygen would otherwise stop and ask whether to overwrite it)."""
        key = self.work_dir / "keys" / name
        key.parent.mkdir(parents=True, exist_ok=True)
        for old in (key, key.with_name(key.name + ".pub")):
            old.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f",
                        str(key)], check=True, stdin=subprocess.DEVNULL)
        self.keys.append(key)
        return key

    def register(self, key: Path) -> subprocess.CompletedProcess:
        """``flwr supernode register <key>.pub <connection>``; on success the node id fixed at
        registration ("SuperNode <id> registered successfully.") is added to ``registered``."""
        res = self.cli(["supernode", "register", str(key) + ".pub", self.connection])
        m = re.search(r"SuperNode (\d+) registered", res.stdout)
        if res.returncode == 0 and m:
            self.registered.append(int(m.group(1)))
        return res

    def cli(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=flower_env(self.cli_home), cwd=PROJECT,
                              capture_output=True, text=True, timeout=timeout)

    def start_supernode(self, index: int, node_config: Mapping[str, Any],
                        key: Path | None = None, name: str | None = None) -> subprocess.Popen:
        home = self.work_dir / f"supernode-{index}"
        home.mkdir(parents=True, exist_ok=True)
        cmd = ["flower-supernode", *self._tls_args(), "--superlink", self.address,
               "--host", "127.0.0.1", "--port", str(free_port()),
               "--node-config", config_string(node_config)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        proc = self.procs.start(name or f"supernode-{index}", cmd, flower_env(home), cwd=home)
        self.supernodes.append(proc)
        return proc

    def node_list(self) -> list[dict[str, Any]]:
        """``flwr supernode list <connection> --format json`` → its ``nodes`` (``node-id``,
        ``status`` = registered/online/offline/...); [] when the CLI fails."""
        res = self.cli(["supernode", "list", self.connection, "--format", "json"])
        if res.returncode != 0:
            return []
        try:
            data = json.loads(res.stdout)
        except ValueError:
            return []
        nodes = data.get("nodes", []) if isinstance(data, dict) else data
        return [n for n in nodes if isinstance(n, dict)]

    def online_node_ids(self) -> set[int]:
        return {int(n["node-id"]) for n in self.node_list()
                if str(n.get("status", "")).lower() == "online" and "node-id" in n}

    def online_nodes(self) -> int:
        return len(self.online_node_ids())

    def runs(self) -> list[dict[str, Any]]:
        """``flwr ls <connection> --format json`` → its ``runs`` (status, network-traffic...)."""
        res = self.cli(["ls", self.connection, "--format", "json"])
        if res.returncode != 0:
            raise RuntimeError(f"flwr ls failed: {res.stdout}{res.stderr}")
        return json.loads(res.stdout)["runs"]

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online_nodes() >= n:
                return
            time.sleep(1.0)
        raise TimeoutError(f"fewer than {n} SuperNodes online after {timeout:.0f}s")

    def start(self) -> "Deployment":
        self.start_superlink()
        for i, nc in enumerate(self.node_configs):
            key = None
            if self.auth:
                key = self.make_key(f"supernode-{i}")
                reg = self.register(key)
                if reg.returncode != 0:
                    raise RuntimeError(f"flwr supernode register failed: {reg.stdout}{reg.stderr}")
            self.start_supernode(i, nc, key)
        self.wait_nodes(len(self.node_configs))
        return self

    def run(self, run_config: Mapping[str, Any], timeout: float = 1800,
            log_file: Path | None = None, stream: bool = False) -> subprocess.CompletedProcess:
        return flwr_run(PROJECT, self.connection, self.cli_home, run_config, timeout=timeout,
                        log_file=log_file, stream=stream)


def _parse_kv(items: list[str]) -> dict[str, Any]:
    import tomllib

    return tomllib.loads("\n".join(items)) if items else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedlora.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sim = sub.add_parser("sim", help="run a simulation on a SuperLink started (and stopped) here")
    sim.add_argument("--nodes", type=int, default=2)
    sim.add_argument("--cpus-per-node", type=float, default=1)
    sim.add_argument("--gpus-per-node", type=float, default=0,
                     help="Ray GPU share per simulated node, e.g. 0.1 (default 0: none reserved)")
    sim.add_argument("--work-dir", default=str(PROJECT / "runs" / ".flwr"))
    sim.add_argument("overrides", nargs="*", help='run-config overrides: key=value (TOML values)')
    dep = sub.add_parser("deploy", help="a real SuperLink + N SuperNodes on 127.0.0.1, run, stop")
    dep.add_argument("--nodes", type=int, default=2)
    dep.add_argument("--tls", action="store_true", help="HTTPS with a fresh CA (scripts/make-certs.sh)")
    dep.add_argument("--auth", action="store_true", help="SuperNode authentication (registered keys)")
    dep.add_argument("--work-dir", default=str(PROJECT / "runs" / ".deploy"))
    dep.add_argument("overrides", nargs="*", help='run-config overrides: key=value (TOML values)')
    args = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    rc = _parse_kv(args.overrides)
    rc.setdefault("run-dir", str(PROJECT / "runs"))
    rc.setdefault("run-name", time.strftime("%Y%m%d-%H%M%S"))
    if args.cmd == "deploy":
        # one fresh directory per run: SuperLink state, node homes, keys, certs, logs
        work = Path(args.work_dir).resolve() / str(rc["run-name"])
        with Processes(work / "logs") as procs:
            d = Deployment(procs, work, args.nodes, tls=args.tls, auth=args.auth).start()
            print(f"SuperLink {d.address} ({'TLS' if args.tls else 'insecure'}"
                  f"{', SuperNode auth' if args.auth else ''}), {args.nodes} SuperNodes online; "
                  f"logs in {work / 'logs'}", flush=True)
            res = d.run(rc, stream=True)
        print(f"records: {rc['run-dir']}/{rc['run-name']}/rounds.jsonl  rounds.csv  summary.json")
        return res.returncode
    res, run_dir = run_simulation(rc, args.nodes, Path(args.work_dir), args.cpus_per_node,
                                  stream=True, gpus_per_node=args.gpus_per_node)
    if res.returncode == 0:
        print(f"records: {run_dir}/rounds.jsonl  rounds.csv  summary.json")
    return res.returncode


if __name__ == "__main__":
    raise SystemExit(main())
