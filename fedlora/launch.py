"""Start and stop real Flower processes for a run, by PID, even on failure.

Used by ``./run``, the tests and the benchmarks. A simulation run here is the same code path as
``flwr run .``: a ``flower-superlink --simulation`` (started by us, so we know its PID instead of
leaving Flower's detached managed SuperLink behind), a connection in ``$FLWR_HOME/config.toml``,
and ``flwr run <app> <connection> --stream``.

    python -m fedlora.launch sim --nodes 4 -- num-server-rounds=3 method="flocora"

Before any process starts the whole run config is checked (:mod:`fedlora.validate`; relative
paths resolve against the caller's directory). A run is judged by Flower's run status and its
summary.json (:func:`judge`), not by ``flwr run``'s exit code. Exit status: 0 completed, 1 failed,
2 refused (one line each on stderr), 128+N stopped by signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import httpx

from . import provenance
from .validate import ConfigError, check_run_name, run_folder

PROJECT = Path(__file__).resolve().parent.parent
PRESET_NAMES = ("main", "vision", "flowertune-nlp")  # fedlora/presets.py (not imported here: it stays light)


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
    # the ServerApp runs from Flower's unpacked FAB (no .git): it records this checkout's commit
    # (fedlora/provenance.py)
    env[provenance.ENV] = provenance.launcher_env()
    env.update(extra or {})
    return env


def hub_offline() -> bool:
    """Will the processes :func:`flower_env` starts have the Hugging Face hub switched off?"""
    return "1" in (os.environ.get("HF_HUB_OFFLINE", "1"),
                   os.environ.get("HF_DATASETS_OFFLINE", "1"))


_PORTS_HANDED_OUT: set[int] = set()
_PORTS_LOCK = threading.Lock()
_PORT_FLOOR = 20000


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ephemeral ports (``bind(0)`` and the source ports of outgoing
    connections)."""
    with contextlib.suppress(OSError, ValueError):
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now and that this process has never handed out before.

    Ports come from below the kernel's ephemeral range, so neither ``bind(0)`` elsewhere nor
    the source port of an outgoing connection (every SuperNode opens many) takes them
    meanwhile; ``bind(0)`` itself may give the same port twice once it is released, which is
    how two SuperNodes once got one port. The port is released before the daemon binds it, so
    another *process* can still take it: start daemons with :func:`start_daemon`, which starts
    them again on a new port when their log says "address already in use"."""
    lo, _ = _ephemeral_ports()
    with _PORTS_LOCK:
        for _ in range(500):
            if lo - _PORT_FLOOR >= 1000:
                port = random.randrange(_PORT_FLOOR, lo)
            else:  # an unusual range: let the kernel choose
                with socket.socket() as s:
                    s.bind((host, 0))
                    port = s.getsockname()[1]
            if port in _PORTS_HANDED_OUT:
                continue
            try:
                with socket.socket() as s:
                    s.bind((host, port))
            except OSError:
                continue
            _PORTS_HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free port found on {host}")


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
    """Set ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml`` (read with ``tomllib``, written
    with ``tomli_w``), replacing a table of that name left by an earlier run in the same
    ``FLWR_HOME``; other tables are kept."""
    import tomllib

    import tomli_w

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    doc = tomllib.loads(path.read_text()) if path.exists() else {}
    table: dict[str, Any] = {"address": address}
    if insecure:
        table["insecure"] = True
    if root_certificates:
        table["root-certificates"] = str(root_certificates)
    doc.setdefault("superlink", {})[name] = table
    path.write_text(tomli_w.dumps(doc))


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

    def retire(self, name: str, proc: subprocess.Popen, suffix: str) -> None:
        """Stop ``proc`` (whatever it left) and keep its log as ``<name>.<suffix>.log``, so that
        ``name`` can be started again with a fresh log."""
        self.stop(proc, grace=5.0)
        log = self.log_dir / f"{name}.log"
        if log.exists():
            log.replace(self.log_dir / f"{name}.{suffix}.log")


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


# what a daemon prints once its port is bound: Flower's daemons (uvicorn), nginx (error_log at
# "notice"; it binds its listen sockets before it starts the workers)
UVICORN_BOUND = "Uvicorn running on"
NGINX_BOUND = "start worker processes"
ADDRESS_IN_USE = re.compile(r"address already in use", re.IGNORECASE)


def wait_bound(procs: Processes, name: str, proc: subprocess.Popen, ready: str,
               timeout: float = 120.0) -> bool:
    """Wait until ``ready`` is in the log of ``name``, i.e. the daemon holds its port: True.
    False when it exited because the port was taken ("address already in use": start it again
    on another port). Raises when it exited for another reason, or after ``timeout``.

    The daemon's own log is the proof, not a request to the port: a request could be answered
    by whatever process took the port first."""
    deadline = time.monotonic() + timeout
    while True:
        log = procs.log(name)
        if ready in log:
            return True
        if proc.poll() is not None:
            if ADDRESS_IN_USE.search(log):
                return False
            raise RuntimeError(f"{name} exited with {proc.returncode} before it was up:\n"
                               f"{log[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not up after {timeout:.0f}s:\n{log[-3000:]}")
        time.sleep(0.1)


def start_daemon(procs: Processes, name: str, cmd_for_port: Callable[[int], list[str]],
                 env: Mapping[str, str], cwd: Path | None = None, ready: str = UVICORN_BOUND,
                 timeout: float = 120.0, attempts: int = 5) -> tuple[subprocess.Popen, int]:
    """Start ``cmd_for_port(port)`` on a :func:`free_port` and wait until it has bound it;
    when another process took the port first, start it again on a new one (the failed
    attempt's log is kept as ``<name>.bind-failed-<n>.log``). Returns (process, port)."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        proc = procs.start(name, cmd_for_port(port), env, cwd=cwd)
        if wait_bound(procs, name, proc, ready, timeout):
            return proc, port
        procs.retire(name, proc, f"bind-failed-{attempt}")
    raise RuntimeError(f"{name}: every port tried was taken ({attempts} attempts)")


def start_sim_superlink(procs: Processes, flwr_home: Path, port: int | None = None,
                        name: str = "sim") -> str:
    """A simulation SuperLink on 127.0.0.1 and a connection ``name`` to it (on ``port``, or on
    a free port, taking another one when that is taken before the SuperLink binds it)."""
    env = flower_env(flwr_home)

    def cmd(p: int) -> list[str]:
        return ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
                "--port", str(p), "--database", str(flwr_home / "state.db"),
                "--disable-runtime-dependency-installation"]

    if port:
        proc = procs.start("superlink", cmd(port), env, cwd=flwr_home)
    else:
        proc, port = start_daemon(procs, "superlink", cmd, env, cwd=flwr_home)
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    write_connection(flwr_home, name, f"127.0.0.1:{port}")
    return name


def flwr_run(app: Path, connection: str, flwr_home: Path, run_config: Mapping[str, Any],
             federation_config: Mapping[str, Any] | None = None, timeout: float = 1800,
             log_file: Path | None = None, stream: bool = False) -> subprocess.CompletedProcess:
    """``flwr run <app> <connection> --stream`` with the given overrides; returns when the run
    has finished (or raises TimeoutExpired). Output is captured, written to ``log_file``, or
    (``stream``) copied line by line to this process's stdout and captured as well. The
    returncode is flwr's own (0 also when the ServerApp failed): :func:`judge` tells."""
    cmd = ["flwr", "run", str(app), connection, "--stream"]
    if run_config:
        cmd += ["--run-config", config_string(run_config)]
    if federation_config:
        cmd += ["--federation-config", config_string(federation_config)]
    env = flower_env(flwr_home)
    if not stream:
        out = open(log_file, "w") if log_file else subprocess.PIPE
        try:
            return subprocess.run(cmd, env=env, cwd=app, stdout=out, stderr=subprocess.STDOUT,
                                  text=True, timeout=timeout)
        finally:
            if log_file:
                out.close()
    proc = subprocess.Popen(cmd, env=env, cwd=app, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    lines: list[str] = []

    def copy() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(10)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines), None)


class RunResult(subprocess.CompletedProcess):
    """``flwr run``'s result, judged (:func:`judge`): ``returncode`` 0 only when Flower says the
    run finished:completed and this run wrote ``summary.json``; else non-zero with ``reason``
    (one line). ``flwr_returncode`` is flwr's own; ``status`` is Flower's run status."""

    def __init__(self, res: subprocess.CompletedProcess, reason: str = "",
                 run_id: int | None = None, status: str = "", run_dir: Path | None = None):
        super().__init__(res.args, res.returncode or (1 if reason else 0), res.stdout,
                         res.stderr)
        self.flwr_returncode = res.returncode
        self.reason, self.run_id, self.status, self.run_dir = reason, run_id, status, run_dir


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTED = re.compile(r"Successfully started run (\d+)")
FLOWER_PREFIXES = ("Simulation failed with exception: ", "ServerApp failed with exception: ")


def run_status(cli: Callable[[list[str]], subprocess.CompletedProcess], connection: str,
               run_id: int | None, wait: float = 30.0) -> dict[str, Any] | None:
    """Flower's record of a run (``flwr ls <connection> [--run-id N] --format json``:
    ``status`` is ``pending``/``starting``/``running``/``finished:<completed|failed|stopped>``,
    ``status-details`` the reason), polled until it is finished or ``wait`` s have passed.
    Without ``run_id``: the only run on that SuperLink. None when Flower cannot tell."""
    deadline = time.monotonic() + wait
    found = None
    while True:
        args = ["ls", connection, "--format", "json"]
        if run_id is not None:
            args += ["--run-id", str(run_id)]
        try:
            res = cli(args)
            runs = json.loads(res.stdout)["runs"] if res.returncode == 0 else None
        except (ValueError, KeyError, TypeError, OSError, subprocess.SubprocessError):
            runs = None
        if runs is None:
            return found
        if len(runs) == 1:
            found = runs[0]
            if str(found.get("status", "")).startswith("finished") or \
                    time.monotonic() > deadline:
                return found
        elif time.monotonic() > deadline or not runs:
            return found
        time.sleep(1.0)


def judge(res: subprocess.CompletedProcess, cli: Callable[[list[str]], subprocess.CompletedProcess],
          connection: str, run_dir: Path, started: float) -> RunResult:
    """Did the run succeed? Flower's run status (not flwr's exit code, which is 0 when the
    ServerApp raised) must be finished:completed, and ``run_dir/summary.json`` written since
    ``started`` (time.time()). The reason names Flower's status details, i.e. the ServerApp's
    exception message."""
    text = _ANSI.sub("", res.stdout or "")
    m = STARTED.search(text)
    run_id = int(m.group(1)) if m else None
    if res.returncode != 0:
        last = [ln.strip() for ln in text.splitlines() if ln.strip()]
        why = last[-1] if last else ""
        return RunResult(res, f"flwr run exited with {res.returncode}: {why}"[:500],
                         run_id, "", run_dir)
    info = run_status(cli, connection, run_id) or {}
    status = str(info.get("status", ""))
    details = str(info.get("status-details", "")).strip()
    for prefix in FLOWER_PREFIXES:
        details = details.removeprefix(prefix.strip()).strip()
    details = " ".join(details.split())
    name = f"run {run_id}" if run_id is not None else "the run"
    if status.startswith("finished:") and status != "finished:completed":
        reason = f"{name} {status.split(':', 1)[1]}: {details or '(no details from Flower)'}"
        return RunResult(res, reason[:1000], run_id, status, run_dir)
    if status != "finished:completed":
        return RunResult(res, f"{name} did not finish (Flower status: {status or 'unknown'})",
                         run_id, status, run_dir)
    summary = Path(run_dir) / "summary.json"
    try:
        fresh = summary.stat().st_mtime >= started - 2.0
    except OSError:
        fresh = False
    if not fresh:
        return RunResult(res, f"{name} finished but wrote no {summary}", run_id, status, run_dir)
    return RunResult(res, "", run_id, status, run_dir)


def flower_cli(flwr_home: Path, timeout: float = 120) -> Callable[[list[str]],
                                                               subprocess.CompletedProcess]:
    """``flwr <args>`` with ``flwr_home``'s connections, output captured."""
    def cli(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=flower_env(flwr_home), cwd=flwr_home,
                              capture_output=True, text=True, timeout=timeout)
    return cli


def run_simulation(run_config: Mapping[str, Any], nodes: int = 2, work_dir: Path | None = None,
                   cpus_per_node: float = 1, timeout: float = 1800, stream: bool = False,
                   gpus_per_node: float = 0) -> tuple[RunResult, Path]:
    """One simulated run end to end; returns (judged result, run directory). The config is
    checked first (:func:`fedlora.validate.check`: ConfigError before anything is created).

    ``gpus_per_node``: Ray GPU share per simulated node (e.g. 0.1 = ten ClientApps per GPU), so
    Ray schedules ClientApps by GPU memory as well as CPUs; with 0 Ray reserves no GPU for them
    (run-config ``device=cpu`` keeps them off any GPU they might still see)."""
    from .validate import check

    work_dir = Path(work_dir or PROJECT / "runs" / ".flwr").resolve()
    rc = dict(run_config)
    rc.setdefault("run-dir", str((work_dir / "runs").resolve()))
    rc.setdefault("run-name", time.strftime("%Y%m%d-%H%M%S"))
    rc = check(rc, hub_offline=hub_offline())
    run_dir = run_folder(rc)
    flwr_home = work_dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    with Processes(work_dir / "logs") as procs:
        conn = start_sim_superlink(procs, flwr_home)
        started = time.time()
        res = flwr_run(PROJECT, conn, flwr_home, rc,
                       {"num-supernodes": nodes, "client-resources-num-cpus": cpus_per_node,
                        "client-resources-num-gpus": gpus_per_node},
                       timeout=timeout, stream=stream)
        judged = judge(res, flower_cli(flwr_home), conn, run_dir, started)
    return judged, run_dir


# ---------------------------------------------------------------------------------- deployment


NGINX_TEMPLATE = PROJECT / "deploy" / "nginx-fleet.conf.template"


def nginx_binary() -> str | None:
    """nginx to run the Fleet proxy with: ``$FEDLORA_NGINX``, ``nginx`` on PATH, or Debian's
    /usr/sbin/nginx (not on a normal user's PATH). ``scripts/bootstrap.sh`` installs it."""
    for cand in (os.environ.get("FEDLORA_NGINX"), shutil.which("nginx"), "/usr/sbin/nginx"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def render_nginx_conf(*, fleet_listen: str, superlink: str, superlink_name: str, cert: Path,
                      key: Path, ca: Path, state_dir: Path, error_log: str | None = None) -> str:
    """``deploy/nginx-fleet.conf.template`` with its ``@NAME@`` placeholders filled in."""
    values = {"FLEET_LISTEN": fleet_listen, "SUPERLINK": superlink,
              "SUPERLINK_NAME": superlink_name, "CERT": cert, "KEY": key, "CA": ca,
              "STATE_DIR": state_dir, "ERROR_LOG": error_log or f"{state_dir}/error.log"}
    text = NGINX_TEMPLATE.read_text()
    for name, value in values.items():
        value = str(value)
        if not value or re.search(r"[\s;{}'\"#$]", value):
            raise ValueError(f"{name}={value!r} cannot go into an nginx config unquoted")
        text = text.replace(f"@{name}@", value)
    settings = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    left = sorted(set(re.findall(r"@[A-Z_]+@", settings)))
    if left:
        raise ValueError(f"placeholders left in {NGINX_TEMPLATE.name}: {left}")
    return text


class Deployment:
    """A real SuperLink and N SuperNodes on this machine (one ``FLWR_HOME`` each, as if on
    separate hosts), started through a :class:`Processes` that stops them all.

    Default (secure): a fresh CA and server certificate (``scripts/make-certs.sh``), SuperNode
    authentication (one ECDSA key per node, registered by the operator with ``flwr supernode
    register``), and the SuperLink bound to **127.0.0.1 only**: Flower 1.41 serves Control,
    Runtime and Fleet on that one port, and its Control API has no authentication. SuperNodes
    reach it through an nginx *Fleet proxy* on ``host`` (``deploy/nginx-fleet.conf.template``,
    TLS with the same certificate) that forwards only the Fleet calls a registered node makes;
    Control (``flwr run/ls``, node registration) answers only on the loopback port, which the
    operator's CLI connection ``connection`` uses.

    ``insecure=True``: plain HTTP, no node authentication, no proxy; the SuperLink itself
    listens on ``host`` and everyone who reaches it may register nodes and submit runs."""

    def __init__(self, procs: Processes, work_dir: Path, nodes: int = 2, insecure: bool = False,
                 host: str = "127.0.0.1", node_configs: list[Mapping[str, Any]] | None = None,
                 connection: str = "deployment",
                 node_env: Mapping[int, Mapping[str, str]] | None = None) -> None:
        self.procs, self.work_dir, self.insecure = procs, Path(work_dir), insecure
        #: extra environment per SuperNode index (its SuperExec and ClientApps inherit it)
        self.node_env = {int(k): dict(v) for k, v in (node_env or {}).items()}
        self.tls = self.auth = self.proxy = not insecure
        self.host, self.connection = host, connection
        # the SuperLink's own port (Control + Runtime + Fleet) and the Fleet proxy's, once started
        self.port: int | None = None
        self.fleet_port: int | None = None
        self.superlink_host = host if insecure else "127.0.0.1"
        self.cli_home = self.work_dir / "cli"
        self.certs = self.work_dir / "certs"
        self.node_configs = list(node_configs or [
            {"partition-id": i, "num-partitions": nodes} for i in range(nodes)])
        self.supernodes: list[subprocess.Popen] = []
        self._supernode_specs: list[tuple[int, Mapping[str, Any], Path | None, str]] = []
        self.keys: list[Path] = []
        self.registered: list[int] = []  # node ids fixed by `flwr supernode register`

    @property
    def address(self) -> str:
        """Where the operator's CLI talks to the SuperLink (Control): its own port, on
        127.0.0.1 unless insecure."""
        return f"{self.superlink_host}:{self.port}"

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect: the Fleet proxy, or (insecure) the SuperLink itself."""
        return f"{self.host}:{self.fleet_port}" if self.proxy else self.address

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    def _tls_args(self) -> list[str]:
        return ["--root-certificates", str(self.ca)] if self.tls else ["--insecure"]

    def start_superlink(self) -> subprocess.Popen:
        """The SuperLink (and, unless insecure, the Fleet proxy in front of it); writes the
        operator's CLI connection."""
        home = self.work_dir / "superlink"
        home.mkdir(parents=True, exist_ok=True)
        if self.proxy and nginx_binary() is None:
            raise RuntimeError(
                "nginx not found: the secure deployment puts it in front of the SuperLink "
                "(scripts/bootstrap.sh installs it: apt-get install nginx). Plain HTTP without "
                "node authentication only with insecure=True / --insecure.")
        if self.tls:
            sans = ["localhost", "127.0.0.1"] + [h for h in (self.host,)
                                                 if h not in ("localhost", "127.0.0.1")]
            subprocess.run(["bash", str(PROJECT / "scripts" / "make-certs.sh"), str(self.certs),
                            *sans], check=True, capture_output=True)

        def cmd(port: int) -> list[str]:
            c = ["flower-superlink", "--host", self.superlink_host, "--port", str(port),
                 "--database", str(home / "state.db"),
                 "--disable-runtime-dependency-installation"]
            if self.tls:
                c += ["--ssl-ca-certfile", str(self.ca),
                      "--ssl-certfile", str(self.certs / "server.pem"),
                      "--ssl-keyfile", str(self.certs / "server.key")]
            else:
                c += ["--insecure"]
            if self.auth:
                c += ["--enable-supernode-auth"]
            return c

        proc, self.port = start_daemon(self.procs, "superlink", cmd, flower_env(home), cwd=home)
        scheme = "https" if self.tls else "http"
        wait_http(f"{scheme}://{self.address}/health", proc=proc,
                  verify=str(self.ca) if self.tls else True)
        write_connection(self.cli_home, self.connection, self.address, insecure=not self.tls,
                         root_certificates=str(self.ca) if self.tls else None)
        if self.proxy:
            self.start_fleet_proxy()
        return proc

    def start_fleet_proxy(self) -> subprocess.Popen:
        """nginx on ``host``: TLS, only the Fleet calls, forwarded to the loopback SuperLink."""
        state = self.work_dir / "fleet-proxy"
        state.mkdir(parents=True, exist_ok=True)
        conf = state / "nginx.conf"
        binary = nginx_binary()
        assert binary is not None

        def cmd(port: int) -> list[str]:
            conf.write_text(render_nginx_conf(
                fleet_listen=f"{self.host}:{port}", superlink=f"127.0.0.1:{self.port}",
                superlink_name="localhost", cert=self.certs / "server.pem",
                key=self.certs / "server.key", ca=self.ca, state_dir=state, error_log="stderr"))
            return [binary, "-p", str(state), "-e", "stderr", "-c", str(conf),
                    "-g", "daemon off;"]

        proc, self.fleet_port = start_daemon(self.procs, "fleet-proxy", cmd, os.environ,
                                             cwd=state, ready=NGINX_BOUND, timeout=30)
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

    def _spawn_supernode(self, slot: int) -> subprocess.Popen:
        index, node_config, key, name = self._supernode_specs[slot]
        home = self.work_dir / f"supernode-{index}"
        home.mkdir(parents=True, exist_ok=True)
        cmd = ["flower-supernode", *self._tls_args(), "--superlink", self.fleet_address,
               "--host", "127.0.0.1", "--port", str(free_port()),
               "--node-config", config_string(node_config)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        return self.procs.start(name, cmd, flower_env(home, self.node_env.get(index)), cwd=home)

    def _supernode_bound(self, slot: int, attempts: int = 5) -> subprocess.Popen:
        """Wait until SuperNode ``slot`` holds its Runtime API port; start it again on a new
        port when another process took that one first."""
        name = self._supernode_specs[slot][3]
        for attempt in range(1, attempts + 1):
            if wait_bound(self.procs, name, self.supernodes[slot], UVICORN_BOUND):
                return self.supernodes[slot]
            self.procs.retire(name, self.supernodes[slot], f"bind-failed-{attempt}")
            self.supernodes[slot] = self._spawn_supernode(slot)
        raise RuntimeError(f"{name}: every Runtime API port tried was taken")

    def start_supernode(self, index: int, node_config: Mapping[str, Any],
                        key: Path | None = None, name: str | None = None,
                        wait: bool = True) -> subprocess.Popen:
        """A SuperNode connecting to :attr:`fleet_address`. ``wait``: return once it holds its
        Runtime API port (it may still fail to join the SuperLink afterwards)."""
        self._supernode_specs.append((index, node_config, key, name or f"supernode-{index}"))
        slot = len(self._supernode_specs) - 1
        self.supernodes.append(self._spawn_supernode(slot))
        return self._supernode_bound(slot) if wait else self.supernodes[slot]

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
        first = len(self.supernodes)
        for i, nc in enumerate(self.node_configs):
            key = None
            if self.auth:
                key = self.make_key(f"supernode-{i}")
                reg = self.register(key)
                if reg.returncode != 0:
                    raise RuntimeError(f"flwr supernode register failed: {reg.stdout}{reg.stderr}")
            self.start_supernode(i, nc, key, wait=False)
        for slot in range(first, len(self.supernodes)):  # started together, checked in turn
            self._supernode_bound(slot)
        self.wait_nodes(len(self.node_configs))
        return self

    def run(self, run_config: Mapping[str, Any], timeout: float = 1800,
            log_file: Path | None = None, stream: bool = False) -> RunResult:
        """``flwr run`` on this deployment, judged (:func:`judge`: Flower's run status and the
        run's summary.json)."""
        started = time.time()
        res = flwr_run(PROJECT, self.connection, self.cli_home, run_config, timeout=timeout,
                       log_file=log_file, stream=stream)
        if log_file is not None and res.stdout is None:
            res.stdout = Path(log_file).read_text(errors="replace")
        return judge(res, self.cli, self.connection, run_folder(run_config), started)


def _parse_kv(items: list[str]) -> dict[str, Any]:
    """Run-config overrides ``key=value`` (TOML values). A value that is not TOML is taken as
    a string: the shell strips the quotes of ``method="flocora"`` before we see it (RunConfig
    still checks every value's type). A key given twice is an error."""
    import json
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        try:
            kv = tomllib.loads(item)
        except tomllib.TOMLDecodeError:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} is not key=value") from None
            kv = tomllib.loads(f"{key.strip()} = {json.dumps(value)}")
        for k in kv:
            if k in out:
                raise ValueError(f"run-config key {k!r} given twice")
        out.update(kv)
    return out


RESUME_HELP = ("continue the run in RUN_DIR from its last complete round (its checkpoint's run "
               "config is reused; overrides may only change where things run, or raise "
               "num-server-rounds)")


def main(argv: list[str] | None = None, light: bool = False) -> int:
    """The command line; returns the exit status (:data:`EXIT_FAILED`, :data:`EXIT_REFUSED`).
    ``light``: check codec specs without importing torch (this process then never encodes)."""
    ap = argparse.ArgumentParser(prog="python -m fedlora.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sim = sub.add_parser("sim", help="run a simulation on a SuperLink started (and stopped) here")
    sim.add_argument("--nodes", type=int, default=2)
    sim.add_argument("--cpus-per-node", type=float, default=1)
    sim.add_argument("--gpus-per-node", type=float, default=0,
                     help="Ray GPU share per simulated node, e.g. 0.1 (default 0: none reserved)")
    sim.add_argument("--work-dir", default=str(PROJECT / "runs" / ".flwr"))
    sim.add_argument("--resume", metavar="RUN_DIR", help=RESUME_HELP)
    sim.add_argument("--preset", choices=sorted(PRESET_NAMES),
                     help="start from a named run config (fedlora/presets.py; ./run uses main); "
                     "overrides win over it")
    sim.add_argument("overrides", nargs="*", help='run-config overrides: key=value (TOML values)')
    dep = sub.add_parser(
        "deploy", help="a real SuperLink + N SuperNodes on 127.0.0.1, run, stop",
        description="By default: HTTPS with a fresh CA, SuperNode authentication (one key per "
        "node, registered through Control), the SuperLink (Control API) on 127.0.0.1 only and "
        "the SuperNodes connecting through an nginx proxy that forwards only Fleet calls.")
    dep.add_argument("--nodes", type=int, default=2)
    dep.add_argument("--insecure", action="store_true",
                     help="plain HTTP, no node authentication, no proxy: anyone who reaches "
                     "the SuperLink's port may join as a node and submit runs")
    dep.add_argument("--work-dir", default=str(PROJECT / "runs" / ".deploy"))
    dep.add_argument("--resume", metavar="RUN_DIR", help=RESUME_HELP)
    dep.add_argument("overrides", nargs="*", help='run-config overrides: key=value (TOML values)')
    px = sub.add_parser(
        "fleet-proxy-conf", help="print the nginx config of the Fleet proxy (for a deployment "
        "by hand or Docker: docs/deployment.md)")
    px.add_argument("--listen", required=True, help="public address:port the SuperNodes dial")
    px.add_argument("--superlink", default="127.0.0.1:9093",
                    help="the SuperLink's loopback address:port (default 127.0.0.1:9093)")
    px.add_argument("--certs", required=True,
                    help="folder with ca.crt, server.pem, server.key, as nginx will see it")
    px.add_argument("--superlink-name", default="localhost",
                    help="a DNS name in the SuperLink certificate (default localhost)")
    px.add_argument("--state-dir", default="/var/lib/nginx",
                    help="existing folder for nginx's pid file, access log and temp dirs")
    px.add_argument("--error-log", default="stderr")
    args = ap.parse_args(argv)
    if args.cmd == "fleet-proxy-conf":
        certs = Path(args.certs)
        print(render_nginx_conf(
            fleet_listen=args.listen, superlink=args.superlink,
            superlink_name=args.superlink_name, cert=certs / "server.pem",
            key=certs / "server.key", ca=certs / "ca.crt", state_dir=Path(args.state_dir),
            error_log=args.error_log), end="")
        return 0
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    try:
        rc, work = prepare(args, light=light)
    except (ConfigError, ValueError, OSError) as err:
        print(f"fedlora: refused: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    try:
        res, run_dir = _launch(args, rc, work)
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:  # a daemon did not start
        print(f"fedlora: run failed: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    if res.returncode != 0:
        print(f"fedlora: run failed: {res.reason}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    if getattr(args, "preset", None) == "main" and not getattr(args, "resume", None):
        from .presets import compare_main

        print(compare_main(run_dir, PROJECT / "results" / "main-job"), flush=True)
    print(f"records: {run_dir}/rounds.jsonl  rounds.csv  summary.json")
    return 0


def _launch(args: argparse.Namespace, rc: dict[str, Any], work: Path) -> tuple[RunResult, Path]:
    """Start the processes of ``sim``/``deploy``, run, stop them: (judged result, run folder)."""
    if args.cmd == "deploy":
        # one fresh directory per run: SuperLink state, node homes, keys, certs, logs
        with Processes(work / "logs") as procs:
            d = Deployment(procs, work, args.nodes, insecure=args.insecure).start()
            if args.insecure:
                print(f"SuperLink {d.address} (plain HTTP, no node authentication: anyone who "
                      f"reaches it may join and submit runs)", flush=True)
            else:
                print(f"SuperLink {d.address} (TLS; Control only on this loopback port), Fleet "
                      f"proxy {d.fleet_address} (TLS, Fleet calls only), SuperNode "
                      f"authentication: nodes {d.registered}", flush=True)
            print(f"{args.nodes} SuperNodes online; logs in {work / 'logs'}", flush=True)
            res = d.run(rc, stream=True)
        return res, run_folder(rc)
    return run_simulation(rc, args.nodes, work, args.cpus_per_node, stream=True,
                          gpus_per_node=args.gpus_per_node)


#: exit statuses of ``python -m fedlora.launch`` (and ``./run``): 0 the run completed and wrote
#: its records; 1 it failed (Flower's status, or no summary.json); 2 refused before any Flower
#: process started (bad config or arguments); 128+N stopped by signal N
EXIT_FAILED, EXIT_REFUSED = 1, 2


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


def prepare(args: argparse.Namespace, light: bool = False) -> tuple[dict[str, Any], Path]:
    """The checked run config and the work folder of ``sim``/``deploy``, before anything is
    created: the whole config (:func:`fedlora.validate.check`, relative paths against this
    directory), the node counts, and ``--work-dir``/``run-name`` (a deployment's folder is
    ``<work-dir>/<run-name>``, which must stay inside ``--work-dir``)."""
    from .validate import check

    if args.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
    if args.cmd == "sim" and not (args.cpus_per_node > 0 and args.gpus_per_node >= 0):
        raise ValueError("--cpus-per-node must be > 0 and --gpus-per-node >= 0")
    rc = _parse_kv(args.overrides)
    if getattr(args, "preset", None) and not getattr(args, "resume", None):
        from .presets import PRESETS, missing_keys

        rc = {**PRESETS[args.preset], **rc}
        if missing_keys(args.preset, rc):
            raise ValueError(missing_keys(args.preset, rc))
    if "run-name" in rc:
        check_run_name(str(rc["run-name"]))
    if getattr(args, "resume", None):
        from .checkpoint import CheckpointError, resume_run_config

        try:
            rc = resume_run_config(Path(args.resume), rc)
        except CheckpointError as err:
            raise ValueError(str(err)) from None
    rc.setdefault("run-dir", str(PROJECT / "runs"))
    rc.setdefault("run-name", time.strftime("%Y%m%d-%H%M%S"))
    rc = check(rc, cwd=os.getcwd(), light=light, hub_offline=hub_offline())
    base = Path(args.work_dir).expanduser().resolve()
    if base.exists() and not base.is_dir():
        raise ValueError(f"--work-dir {str(base)!r} is not a folder")
    if args.cmd == "sim":
        return rc, base
    if not args.insecure and nginx_binary() is None:
        raise ValueError("nginx not found: the secure deployment puts it in front of the "
                         "SuperLink (scripts/bootstrap.sh installs it); or --insecure")
    work = (base / str(rc["run-name"])).resolve()
    if work.parent != base:
        raise ValueError(f"run-name {rc['run-name']!r} would put the deployment outside "
                         f"--work-dir {str(base)!r}")
    return rc, work


if __name__ == "__main__":
    raise SystemExit(main(light=True))
