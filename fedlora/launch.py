"""Start and stop real Flower processes for a run, by PID, even on failure.

Used by ``./run``, the tests and the benchmarks. ``sim`` (e.g. ``python -m fedlora.launch sim
--nodes 4 -- num-server-rounds=3``) is ``flwr run .``'s code path on a ``flower-superlink
--simulation`` we start (its PID known), with a connection in ``$FLWR_HOME/config.toml``.

A deployment: ``deploy`` (SuperLink + N SuperNodes on this machine) is built from the two host
roles of a multi-host federation, ``superlink-host`` (SuperLink on 127.0.0.1, Fleet proxy on
--listen, node keys registered) and ``node-host`` (one SuperNode); docs/deployment.md.

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
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import httpx

from . import provenance
from .validate import ConfigError, check_eval_data, check_run_name, run_folder

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
                   cpus_per_node: int = 1, timeout: float = 1800, stream: bool = False,
                   gpus_per_node: float = 0, ray_cpus: int = 0) -> tuple[RunResult, Path]:
    """One simulated run end to end; returns (judged result, run directory). The config is
    checked first (:func:`fedlora.validate.check`: ConfigError before anything is created).

    ``ray_cpus`` > 0: the logical CPUs Ray is started with (Flower's ``init-args-num-cpus``), so
    more ClientApps than cores can run at once — e.g. simulated stragglers that sleep
    (docs/async.md) then do not hold the cores' only slots.

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
                        "client-resources-num-gpus": gpus_per_node,
                        **({"init-args-num-cpus": int(ray_cpus)} if ray_cpus > 0 else {})},
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


# ------------------------------------------------------------ certificates and the TLS name check

#: names every SuperLink certificate carries: the Fleet proxy checks its upstream as ``localhost``
#: (``proxy_ssl_name``), the operator's ``flwr`` CLI dials ``127.0.0.1``
DEFAULT_CERT_NAMES = ("localhost", "127.0.0.1")
MAKE_CERTS = PROJECT / "scripts" / "make-certs.sh"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class TLSCheckError(RuntimeError):
    """A TLS connection that a node (or the Fleet proxy) would make fails; the message is one
    line naming what was expected and what was presented."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) → (host, port); ValueError naming the address otherwise."""
    host, sep, port = str(address).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host, int(port)


def cert_names(cert: bytes | Path) -> list[str]:
    """The DNS names and IP addresses in a certificate's subjectAltName (PEM/DER bytes or a PEM
    file), in the certificate's order."""
    from cryptography import x509

    data = Path(cert).read_bytes() if isinstance(cert, Path) else cert
    c = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----")
         else x509.load_der_x509_certificate(data))
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def name_matches(name: str, names: list[str]) -> bool:
    """Would a TLS client dialing ``name`` accept a certificate naming ``names``? IPs compare as
    addresses, DNS names case-insensitively, ``*.example.org`` covers one label."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        ip = None
    for n in names:
        if ip is not None:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(n) == ip:
                    return True
            continue
        n, host = n.lower().rstrip("."), name.lower().rstrip(".")
        if n == host or (n.startswith("*.") and "." in host
                         and host.split(".", 1)[1] == n[2:]):
            return True
    return False


def make_certs(out: Path, names: list[str]) -> None:
    """``scripts/make-certs.sh out names...``: a CA and a server certificate naming localhost,
    127.0.0.1 and ``names``; RuntimeError with the script's message when it refuses or fails."""
    res = subprocess.run(["bash", str(MAKE_CERTS), str(out), *names], capture_output=True,
                         text=True)
    if res.returncode == 2:  # refused: a folder git would track
        raise ValueError("certificates not made: " + " ".join(res.stderr.split()).removeprefix(
            "make-certs.sh: refused: "))
    if res.returncode != 0:
        raise RuntimeError("scripts/make-certs.sh failed: " + " ".join(res.stderr.split()))


def check_cert_names(pem: Path, required: list[str], fix: str) -> None:
    """ValueError (one line) unless the certificate ``pem`` names every one of ``required``."""
    have = cert_names(pem)
    missing = [n for n in required if not name_matches(n, have)]
    if missing:
        raise ValueError(f"certificate {pem} names {', '.join(have) or 'nothing'} but not "
                         f"{', '.join(missing)} (needed: {', '.join(required)}): {fix}")


def _presented_names(host: str, port: int, timeout: float) -> list[str]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout) as sock, \
            ctx.wrap_socket(sock, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    return cert_names(der) if der else []


def tls_check(address: str, ca: Path, timeout: float = 10.0, who: str = "this node") -> None:
    """Open the TLS connection a SuperNode opens to ``address`` (verify against ``ca``, check
    the name it dials) and translate a failure into one line: a name mismatch names the name
    dialed and the names the certificate presents; an unknown CA, a refused connection, a
    timeout say so. Flower itself only logs "Connection attempt failed, retrying" forever."""
    host, port = split_address(address)
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as err:
        raise TLSCheckError(f"cannot read the CA certificate {ca}: {one_line(err)}") from None
    try:
        with socket.create_connection((host, port), timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as err:
        if err.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
            try:
                presented = ", ".join(_presented_names(host, port, timeout)) or "no names"
            except (OSError, ValueError):
                presented = "(could not read them)"
            raise TLSCheckError(
                f"TLS name mismatch: {who} dials {host!r} but the certificate at {address} "
                f"names {presented}; the SuperLink host must name {host} in its certificate "
                f"(superlink-host --name {host}, or scripts/make-certs.sh DIR {host}), or dial "
                "one of the names it has") from None
        raise TLSCheckError(
            f"TLS check of {address} failed: {err.verify_message} (is {ca} the SuperLink "
            "host's ca.crt?)") from None
    except ssl.SSLError as err:
        raise TLSCheckError(f"TLS handshake with {address} failed ({err.reason or err}): is "
                            "that the Fleet proxy's HTTPS port?") from None
    except socket.gaierror as err:
        raise TLSCheckError(f"cannot resolve {host!r}: {err.strerror or err}") from None
    except ConnectionRefusedError:
        raise TLSCheckError(f"nothing listens at {address} (connection refused): is the "
                            "SuperLink host's Fleet proxy up, and is this its --listen "
                            "address?") from None
    except (socket.timeout, TimeoutError):
        raise TLSCheckError(f"no answer from {address} within {timeout:.0f} s (a firewall, or a "
                            "wrong address?)") from None
    except OSError as err:
        raise TLSCheckError(f"cannot reach {address}: {err.strerror or err}") from None


# ------------------------------------------------------------------------------ the host roles


def state_dir(role: str) -> Path:
    """Default work folder of a host role: ``$XDG_STATE_HOME/fedlora/<role>`` (default
    ``~/.local/state/...``), outside any repository: it holds private keys."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "fedlora" / role


def _start_on(procs: Processes, name: str, cmd_for_port: Callable[[int], list[str]],
              env: Mapping[str, str], port: int | None, cwd: Path | None = None,
              ready: str = UVICORN_BOUND, timeout: float = 120.0) -> tuple[subprocess.Popen, int]:
    """:func:`start_daemon` on a free port, or on the fixed ``port`` (RuntimeError when that is
    taken)."""
    if port is None:
        return start_daemon(procs, name, cmd_for_port, env, cwd=cwd, ready=ready,
                            timeout=timeout)
    proc = procs.start(name, cmd_for_port(port), env, cwd=cwd)
    if not wait_bound(procs, name, proc, ready, timeout):
        raise RuntimeError(f"{name}: port {port} is already in use on this host")
    return proc, port


class SuperLinkHost:
    """The SuperLink host's role: certificates, the SuperLink, the Fleet proxy, node keys.

    Default (secure): a CA and server certificate naming localhost, 127.0.0.1, ``host`` and
    ``names`` (made with ``scripts/make-certs.sh`` in ``certs``, or an existing set whose names
    are checked first), SuperNode authentication (keys registered by the operator with ``flwr
    supernode register``), and the SuperLink bound to **127.0.0.1 only**: Flower 1.41 serves
    Control, Runtime and Fleet on that one port, and its Control API has no authentication.
    SuperNodes reach it through an nginx *Fleet proxy* on ``host`` (TLS with the same
    certificate; ``deploy/nginx-fleet.conf.template``) that forwards only the Fleet calls a
    registered node makes; Control answers only on the loopback port, which the operator's CLI
    connection ``connection`` (in ``cli_home``) uses.

    ``insecure=True``: plain HTTP, no node authentication, no proxy; the SuperLink itself
    listens on ``host`` and everyone who reaches it may register nodes and submit runs.
    ``superlink_port``/``fleet_port``: fixed ports (None: free ones)."""

    def __init__(self, procs: Processes, work_dir: Path, insecure: bool = False,
                 host: str = "127.0.0.1", connection: str = "deployment",
                 superlink_port: int | None = None, fleet_port: int | None = None,
                 names: list[str] | tuple[str, ...] = (), certs: Path | None = None) -> None:
        self.procs, self.work_dir, self.insecure = procs, Path(work_dir), insecure
        self.tls = self.auth = self.proxy = not insecure
        self.host, self.connection = host, connection
        # the SuperLink's own port (Control + Runtime + Fleet) and the Fleet proxy's
        self.port: int | None = superlink_port
        self.fleet_port: int | None = fleet_port
        self.superlink_host = host if insecure else "127.0.0.1"
        self.cli_home = self.work_dir / "cli"
        self.certs = Path(certs) if certs else self.work_dir / "certs"
        self.names = [n for n in names if n]
        self.keys: list[Path] = []
        self.registered: list[int] = []  # node ids fixed by `flwr supernode register`
        self.registered_keys: dict[Path, int | None] = {}  # .pub → node id (None: known before)

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

    def cert_names_needed(self) -> list[str]:
        """localhost, 127.0.0.1, the proxy's listen address (unless a wildcard) and ``names``."""
        out = list(DEFAULT_CERT_NAMES)
        for n in [self.host, *self.names]:
            if n not in WILDCARD_HOSTS and n not in out:
                out.append(n)
        return out

    def ensure_certs(self) -> None:
        """Make the certificates, or check that existing ones name everything needed (a node
        dialing a name the certificate lacks would retry forever, the proxy would answer 502)."""
        needed = self.cert_names_needed()
        if (self.certs / "server.pem").exists():
            check_cert_names(
                self.certs / "server.pem", needed,
                f"remove {self.certs} to have new ones made (then copy the new ca.crt to every "
                f"node host), or remake them: scripts/make-certs.sh {self.certs} "
                + " ".join(needed[2:]))
            return
        make_certs(self.certs, needed[2:])

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
            self.ensure_certs()

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

        proc, self.port = _start_on(self.procs, "superlink", cmd, flower_env(home), self.port,
                                    cwd=home)
        scheme = "https" if self.tls else "http"
        wait_http(f"{scheme}://{self.address}/health", proc=proc,
                  verify=str(self.ca) if self.tls else True)
        write_connection(self.cli_home, self.connection, self.address, insecure=not self.tls,
                         root_certificates=str(self.ca) if self.tls else None)
        if self.proxy:
            self.start_fleet_proxy()
        return proc

    def start_fleet_proxy(self) -> subprocess.Popen:
        """nginx on ``host``: TLS, only the Fleet calls, forwarded to the loopback SuperLink;
        then one Fleet call through it, so that a proxy that cannot reach or verify the
        SuperLink is reported here, in one line, rather than as the nodes' endless retries."""
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

        proc, self.fleet_port = _start_on(self.procs, "fleet-proxy", cmd, os.environ,
                                          self.fleet_port, cwd=state, ready=NGINX_BOUND,
                                          timeout=30)
        self.check_fleet_proxy()
        return proc

    def check_fleet_proxy(self) -> None:
        """An unsigned Fleet call through the proxy must reach Flower (401). A 502 means nginx
        could not talk to the SuperLink: its log says why (a name mismatch names both)."""
        host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host
        url = f"https://{host}:{self.fleet_port}/v1/fleet/pull-messages"
        try:
            r = httpx.post(url, verify=ssl.create_default_context(cafile=str(self.ca)),
                           content=b"", timeout=15.0,
                           headers={"content-type": "application/protobuf"})
        except httpx.HTTPError as err:
            raise TLSCheckError(f"the Fleet proxy at {host}:{self.fleet_port} does not answer "
                                f"over TLS: {one_line(err)}") from None
        if r.status_code != 502:
            return
        log = self.procs.log("fleet-proxy")
        upstream = [ln for ln in log.splitlines() if "upstream" in ln]
        have = ", ".join(cert_names(self.certs / "server.pem"))
        if any("does not match" in ln for ln in upstream):
            raise TLSCheckError(f"TLS name mismatch: the Fleet proxy checks the SuperLink as "
                                f"'localhost' but its certificate names {have}")
        raise TLSCheckError("the Fleet proxy cannot reach the SuperLink (502): "
                            + (upstream[-1].strip() if upstream else "see its log"))

    def make_key(self, name: str) -> Path:
        """A fresh ECDSA P-384 key pair ``keys/<name>`` + ``.pub`` (an old pair is replaced;
        ssh-keygen would otherwise stop and ask whether to overwrite it)."""
        key = make_node_key(self.work_dir / "keys" / name)
        self.keys.append(key)
        return key

    def register(self, key: Path) -> subprocess.CompletedProcess:
        """``flwr supernode register <key>.pub <connection>``; on success the node id fixed at
        registration ("SuperNode <id> registered successfully.") is added to ``registered``."""
        return self.register_pub(Path(str(key) + ".pub"))

    def register_pub(self, pub: Path) -> subprocess.CompletedProcess:
        res = self.cli(["supernode", "register", str(pub), self.connection])
        m = re.search(r"SuperNode (\d+) registered", res.stdout)
        if res.returncode == 0 and m:
            self.registered.append(int(m.group(1)))
            self.registered_keys[Path(pub)] = int(m.group(1))
        elif "already in use" in res.stdout + res.stderr:  # registered by an earlier start
            self.registered_keys[Path(pub)] = None
        return res

    def register_folder(self, folder: Path) -> list[tuple[Path, int | None]]:
        """Register every ``*.pub`` in ``folder`` not registered yet (a key known to this
        SuperLink from an earlier start counts as registered); returns the new ones. A key
        Flower refuses is a ValueError naming the file."""
        new = []
        for pub in sorted(Path(folder).glob("*.pub")):
            if pub in self.registered_keys:
                continue
            res = self.register_pub(pub)
            if pub not in self.registered_keys:
                text = _ANSI.sub("", res.stdout + res.stderr).strip().splitlines()
                raise ValueError(f"node key {pub} was not registered: "
                                 f"{text[-1] if text else res.returncode}")
            new.append((pub, self.registered_keys[pub]))
        return new

    def cli(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=flower_env(self.cli_home), cwd=PROJECT,
                              capture_output=True, text=True, timeout=timeout)

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

    def wait_nodes(self, n: int, timeout: float = 120,
                   between: Callable[[], None] | None = None) -> None:
        """Until ``n`` SuperNodes are online (``between`` runs after every look, e.g. to
        register keys that arrived meanwhile); TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            online = self.online_nodes()
            if online >= n:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{online} of {n} SuperNodes online after {timeout:.0f} s")
            if between is not None:
                between()
            time.sleep(1.0)

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


def make_node_key(key: Path) -> Path:
    """A fresh ECDSA P-384 key pair ``key`` + ``key.pub`` (mode 0600 / 0644), as
    ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` take it."""
    key = Path(key)
    key.parent.mkdir(parents=True, exist_ok=True)
    for old in (key, key.with_name(key.name + ".pub")):
        old.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", key.name,
                    "-f", str(key)], check=True, stdin=subprocess.DEVNULL)
    return key


class NodeHost:
    """The node host's role: one SuperNode dialing ``superlink`` (the Fleet proxy's address)
    with the CA certificate ``ca`` (None: plain HTTP) and its own key, its node config, its
    Runtime API on 127.0.0.1 (``runtime_port``, None: a free port), ``home`` its FLWR_HOME."""

    def __init__(self, procs: Processes, home: Path, superlink: str,
                 node_config: Mapping[str, Any], ca: Path | None = None,
                 key: Path | None = None, name: str = "supernode",
                 env: Mapping[str, str] | None = None, runtime_port: int | None = None) -> None:
        self.procs, self.home, self.superlink = procs, Path(home), superlink
        self.node_config, self.ca, self.key, self.name = dict(node_config), ca, key, name
        self.env, self.runtime_port = dict(env or {}), runtime_port
        self.proc: subprocess.Popen | None = None

    def preflight(self) -> None:
        """The TLS connection the SuperNode will make, checked first (:func:`tls_check`)."""
        if self.ca is not None:
            tls_check(self.superlink, self.ca)

    def spawn(self) -> subprocess.Popen:
        self.home.mkdir(parents=True, exist_ok=True)
        tls = ["--root-certificates", str(self.ca)] if self.ca is not None else ["--insecure"]
        cmd = ["flower-supernode", *tls, "--superlink", self.superlink,
               "--host", "127.0.0.1", "--port", str(self.runtime_port or free_port()),
               "--node-config", config_string(self.node_config)]
        if self.key is not None:
            cmd += ["--auth-supernode-private-key", str(self.key)]
        self.proc = self.procs.start(self.name, cmd, flower_env(self.home, self.env),
                                     cwd=self.home)
        return self.proc

    def bound(self, attempts: int = 5) -> subprocess.Popen:
        """Wait until the SuperNode holds its Runtime API port; start it again on a new port
        when another process took that one first."""
        assert self.proc is not None
        for attempt in range(1, attempts + 1):
            if wait_bound(self.procs, self.name, self.proc, UVICORN_BOUND):
                return self.proc
            if self.runtime_port is not None:
                raise RuntimeError(f"{self.name}: port {self.runtime_port} is already in use")
            self.procs.retire(self.name, self.proc, f"bind-failed-{attempt}")
            self.spawn()
        raise RuntimeError(f"{self.name}: every Runtime API port tried was taken")

    def start(self, wait: bool = True) -> subprocess.Popen:
        self.spawn()
        return self.bound() if wait else self.proc  # type: ignore[return-value]

    def joined(self, timeout: float = 120.0) -> int:
        """Wait until the SuperLink accepted this node: its id. RuntimeError (one line) when
        the node exits first, e.g. with an unregistered key."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            log = _ANSI.sub("", self.procs.log(self.name))
            m = re.search(r"SuperNode ID: (\d+)", log)
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(supernode_failure(log, self.proc.returncode, self.key))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not join within {timeout:.0f} s "
                                   f"(log: {self.procs.log_dir / (self.name + '.log')})")
            time.sleep(0.3)


def supernode_failure(log: str, code: int | None, key: Path | None) -> str:
    """One line for a SuperNode that exited: the reason Flower logged, and the fix."""
    if "Failed to activate" in log:
        pub = f"{key}.pub" if key else "its .pub"
        return (f"the SuperLink refused this node's key (Failed to activate, exit {code}): "
                f"{pub} is not registered there; put it in the SuperLink host's --node-keys "
                "folder")
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    return f"the SuperNode exited with {code}: {lines[-1] if lines else '(empty log)'}"


class Deployment(SuperLinkHost):
    """A real SuperLink and N SuperNodes on this machine, built from the two host roles: one
    :class:`SuperLinkHost` (this object) and one :class:`NodeHost` per node, each with its own
    ``FLWR_HOME`` as if on separate hosts, all started through a :class:`Processes` that stops
    them. Secure by default (see :class:`SuperLinkHost`); one key per node is made here and
    registered through Control before the node starts."""

    def __init__(self, procs: Processes, work_dir: Path, nodes: int = 2, insecure: bool = False,
                 host: str = "127.0.0.1", node_configs: list[Mapping[str, Any]] | None = None,
                 connection: str = "deployment",
                 node_env: Mapping[int, Mapping[str, str]] | None = None) -> None:
        super().__init__(procs, work_dir, insecure=insecure, host=host, connection=connection)
        #: extra environment per SuperNode index (its SuperExec and ClientApps inherit it)
        self.node_env = {int(k): dict(v) for k, v in (node_env or {}).items()}
        self.node_configs = list(node_configs or [
            {"partition-id": i, "num-partitions": nodes} for i in range(nodes)])
        self.nodes: list[NodeHost] = []

    @property
    def supernodes(self) -> list[subprocess.Popen]:
        return [n.proc for n in self.nodes if n.proc is not None]

    def start_supernode(self, index: int, node_config: Mapping[str, Any],
                        key: Path | None = None, name: str | None = None,
                        wait: bool = True) -> subprocess.Popen:
        """A SuperNode connecting to :attr:`fleet_address`. ``wait``: return once it holds its
        Runtime API port (it may still fail to join the SuperLink afterwards)."""
        node = NodeHost(self.procs, self.work_dir / f"supernode-{index}", self.fleet_address,
                        node_config, ca=self.ca if self.tls else None, key=key,
                        name=name or f"supernode-{index}", env=self.node_env.get(index))
        self.nodes.append(node)
        return node.start(wait)

    def start(self) -> "Deployment":
        self.start_superlink()
        first = len(self.nodes)
        for i, nc in enumerate(self.node_configs):
            key = None
            if self.auth:
                key = self.make_key(f"supernode-{i}")
                reg = self.register(key)
                if reg.returncode != 0:
                    raise RuntimeError(f"flwr supernode register failed: {reg.stdout}{reg.stderr}")
            self.start_supernode(i, nc, key, wait=False)
        for node in self.nodes[first:]:  # started together, checked in turn
            node.bound()
        self.wait_nodes(len(self.node_configs))
        return self


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


NODE_CONFIG_KEYS = ("partition-id", "num-partitions", "data-dir", "tier")


def _node_config(text: str, data_dir: str | None) -> dict[str, Any]:
    """``--node-config 'partition-id=0 num-partitions=2'`` (+ ``--data-dir``), checked here:
    known keys, integer ids in range, an existing data folder (made absolute)."""
    import shlex

    nc = _parse_kv(shlex.split(text or ""))
    for key in nc:
        if key not in NODE_CONFIG_KEYS:
            raise ValueError(f"unknown node-config key {key!r} (known: "
                             f"{', '.join(NODE_CONFIG_KEYS)})")
    if data_dir:
        nc["data-dir"] = data_dir
    for key in ("partition-id", "num-partitions"):
        if key not in nc:
            raise ValueError(f"--node-config needs {key} (e.g. 'partition-id=0 "
                             "num-partitions=2')")
        if not isinstance(nc[key], int) or isinstance(nc[key], bool):
            raise ValueError(f"node-config {key} must be an integer, got {nc[key]!r}")
    if not 0 <= nc["partition-id"] < nc["num-partitions"]:
        raise ValueError(f"node-config partition-id {nc['partition-id']} is outside "
                         f"0..{nc['num-partitions'] - 1}")
    if "data-dir" in nc:
        d = Path(str(nc["data-dir"])).expanduser().resolve()
        if not d.is_dir():
            raise ValueError(f"node-config data-dir {str(d)!r} is not a folder on this host")
        nc["data-dir"] = str(d)
    return nc


def _exit_on_sigint() -> None:
    """The host roles serve until stopped: Ctrl-C exits 130 like SIGTERM (143), stopping
    every process started, without a traceback."""
    signal.signal(signal.SIGINT, lambda signum, _frame: sys.exit(128 + signum))


def node_host_main(args: argparse.Namespace) -> int:
    """``node-host``: one SuperNode of a multi-host federation (see :class:`NodeHost`)."""
    work = Path(args.work_dir).expanduser().resolve()
    key = Path(args.key).expanduser().resolve() if args.key else work / "supernode-key"
    if args.make_key:
        if key.exists():
            print(f"fedlora: key {key} exists already (kept)", flush=True)
        else:
            make_node_key(key)
            print(f"fedlora: new node key {key} (private: it never leaves this host)", flush=True)
        print(f"Next: send {key}.pub to the SuperLink host's operator, who puts it in the "
              "--node-keys folder of `python -m fedlora.launch superlink-host`; then, with "
              "that host's ca.crt here, run:\n  python -m fedlora.launch node-host --superlink "
              f"<its --listen address> --ca ca.crt --key {key} --node-config "
              "'partition-id=I num-partitions=N' [--data-dir DIR]", flush=True)
        return 0
    try:
        if not args.superlink or not args.ca:
            raise ValueError("node-host needs --superlink HOST:PORT (the SuperLink host's Fleet "
                             "proxy) and --ca (its ca.crt), or --make-key")
        split_address(args.superlink)
        ca = Path(args.ca).expanduser().resolve()
        if not ca.is_file():
            raise ValueError(f"--ca {str(ca)!r} is not a file (copy the SuperLink host's ca.crt)")
        if args.check:
            tls_check(args.superlink, ca)
            print(f"fedlora: TLS to {args.superlink} verified with {ca}", flush=True)
            return 0
        if not key.is_file():
            raise ValueError(f"no node key at {key}: make one with --make-key and have its .pub "
                             "registered on the SuperLink host")
        nc = _node_config(args.node_config, args.data_dir)
        tls_check(args.superlink, ca)
    except (ValueError, OSError, TLSCheckError) as err:
        print(f"fedlora: refused: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    _exit_on_sigint()
    with Processes(work / "logs") as procs:
        node = NodeHost(procs, work / "home", args.superlink, nc, ca=ca, key=key,
                        runtime_port=args.runtime_port)
        try:
            node.start()
            node_id = node.joined(timeout=args.join_timeout)
        except (RuntimeError, OSError) as err:
            print(f"fedlora: node failed: {one_line(err)}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        print(f"fedlora: joined {args.superlink} as node {node_id} ({config_string(nc)}); "
              f"log {procs.log_dir / 'supernode.log'}. Next: the SuperLink host runs the app "
              "once every node is online. Ctrl-C (or SIGTERM) leaves.", flush=True)
        assert node.proc is not None
        code = node.proc.wait()
        print(f"fedlora: node failed: {supernode_failure(procs.log('supernode'), code, key)}",
              file=sys.stderr, flush=True)
        return EXIT_FAILED


def superlink_host_main(args: argparse.Namespace, light: bool = False) -> int:
    """``superlink-host``: certificates, SuperLink on 127.0.0.1, the Fleet proxy on --listen,
    the node keys of --node-keys registered; then runs the app once --nodes are online (exit
    status judged as for ``deploy``), or (--serve) serves until stopped."""
    try:
        host, port = split_address(args.listen)
        keys = Path(args.node_keys).expanduser().resolve()
        if not keys.is_dir():
            raise ValueError(f"--node-keys {str(keys)!r} is not a folder (put each node's "
                             ".pub there)")
        if (args.nodes is None) == (not args.serve):
            raise ValueError("give --nodes N (run the app once N nodes are online) or --serve "
                             "(keep serving; submit runs with flwr run)")
        if args.serve and args.overrides:
            raise ValueError("run-config overrides go with --nodes, not --serve")
        if nginx_binary() is None:
            raise ValueError("nginx not found: the SuperLink host puts it in front of the "
                             "SuperLink (scripts/bootstrap.sh installs it)")
        rc: dict[str, Any] = {}
        if not args.serve:
            rc, _ = prepare(args, light=light)
        work = Path(args.work_dir).expanduser().resolve()
        certs = Path(args.certs).expanduser().resolve() if args.certs else None
        names = [n for n in args.name if n]
        for n in names:
            if re.search(r"[\s/]", n):
                raise ValueError(f"--name {n!r} is not a host name or IP address")
    except (ConfigError, ValueError, OSError) as err:
        print(f"fedlora: refused: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    _exit_on_sigint()
    with Processes(work / "logs") as procs:
        h = SuperLinkHost(procs, work, host=host, fleet_port=port,
                          superlink_port=args.superlink_port, names=names, certs=certs,
                          connection="superlink-host")
        try:
            h.start_superlink()
            new = h.register_folder(keys)
        except (ValueError, TLSCheckError) as err:
            print(f"fedlora: refused: {one_line(err)}", file=sys.stderr, flush=True)
            return EXIT_REFUSED
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            print(f"fedlora: failed: {one_line(err)}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        dial = f"{names[0] if host in WILDCARD_HOSTS and names else host}:{h.fleet_port}"
        print(superlink_host_banner(h, keys, new, dial), flush=True)

        def register_new() -> None:
            try:
                for pub, node_id in h.register_folder(keys):
                    print(f"fedlora: registered {pub.name} -> node {node_id}", flush=True)
            except ValueError as err:  # one bad key must not stop the others
                print(f"fedlora: {one_line(err)}", file=sys.stderr, flush=True)

        if args.serve:
            print(f"fedlora: serving; new .pub files in {keys} are registered as they arrive. "
                  "Ctrl-C (or SIGTERM) stops everything.", flush=True)
            while True:
                time.sleep(5.0)
                register_new()
        try:
            print(f"fedlora: waiting for {args.nodes} SuperNodes (at most {args.wait:.0f} s)",
                  flush=True)
            h.wait_nodes(args.nodes, timeout=args.wait, between=register_new)
            print(f"fedlora: {args.nodes} SuperNodes online: {sorted(h.online_node_ids())}",
                  flush=True)
            res = h.run(rc, stream=True)
        except (RuntimeError, OSError, subprocess.SubprocessError, TimeoutError) as err:
            print(f"fedlora: run failed: {one_line(err)}", file=sys.stderr, flush=True)
            return EXIT_FAILED
    if res.returncode != 0:
        print(f"fedlora: run failed: {res.reason}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    print(f"records: {run_folder(rc)}/rounds.jsonl  rounds.csv  summary.json")
    return 0


def superlink_host_banner(h: SuperLinkHost, keys: Path, new: list[tuple[Path, int | None]],
                          dial: str) -> str:
    regs = ", ".join(f"{p.name} -> node {i if i is not None else '(registered before)'}"
                     for p, i in new) or f"none yet (no .pub in {keys})"
    return "\n".join([
        "fedlora: SuperLink host ready",
        f"  SuperLink    {h.address}  (Fleet + Control + Runtime API: this host only)",
        f"  Fleet proxy  {h.fleet_address}  (the one port the node hosts may reach)",
        f"  certificate  {h.certs / 'server.pem'} names {', '.join(cert_names(h.certs / 'server.pem'))}",
        f"  node keys    {regs}",
        "Next, on each node host:",
        f"  1. copy {h.ca} there (public; ca.key and server.key stay on this host)",
        f"  2. python -m fedlora.launch node-host --superlink {dial} --ca ca.crt --key <its key> "
        "--node-config 'partition-id=I num-partitions=N' [--data-dir DIR]",
        f"Operator, on this host: FLWR_HOME={h.cli_home} flwr ls {h.connection}",
    ])


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
    sim.add_argument("--cpus-per-node", type=int, default=1,
                     help="Ray CPUs per simulated node: an integer >= 1 (Flower 1.41's "
                          "client-resources-num-cpus)")
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
    sh = sub.add_parser(
        "superlink-host", help="this host runs the SuperLink and the Fleet proxy of a "
        "multi-host federation (docs/deployment.md)",
        description="Certificates naming localhost, 127.0.0.1, the --listen address and every "
        "--name (made in --certs, or existing ones checked); the SuperLink with TLS and "
        "SuperNode authentication on 127.0.0.1 only; the nginx Fleet proxy on --listen (the "
        "one port for the node hosts); every .pub in --node-keys registered (and new ones "
        "while waiting). Prints the next step for the node hosts. Then, with --nodes N, runs "
        "the app with the overrides once N nodes are online and stops (exit status as for "
        "deploy); with --serve, keeps serving until stopped.")
    sh.add_argument("--listen", required=True, metavar="HOST:PORT",
                    help="the Fleet proxy's address on the nodes' network, e.g. 10.0.0.1:9443")
    sh.add_argument("--name", action="append", default=[], metavar="NAME",
                    help="another DNS name or IP the nodes dial (repeatable); the certificate "
                    "always names localhost, 127.0.0.1 and the --listen host")
    sh.add_argument("--node-keys", required=True, metavar="DIR",
                    help="folder of the node hosts' public keys (*.pub)")
    sh.add_argument("--superlink-port", type=int, default=9093,
                    help="the SuperLink's port on 127.0.0.1 (default 9093)")
    sh.add_argument("--certs", metavar="DIR", help="certificate folder (default "
                    "<work-dir>/certs; made when missing, checked when present)")
    sh.add_argument("--work-dir", default=str(state_dir("superlink-host")),
                    help="SuperLink state, CLI home, certificates, logs (default %(default)s)")
    sh.add_argument("--nodes", type=int, help="run the app once this many nodes are online")
    sh.add_argument("--wait", type=float, default=600.0,
                    help="seconds to wait for --nodes (default 600)")
    sh.add_argument("--serve", action="store_true", help="do not run: serve until stopped")
    sh.add_argument("--resume", metavar="RUN_DIR", help=RESUME_HELP)
    sh.add_argument("overrides", nargs="*", help="run-config overrides: key=value (TOML values)")
    nh = sub.add_parser(
        "node-host", help="this host runs one SuperNode of a multi-host federation "
        "(docs/deployment.md)",
        description="--make-key: a new key pair (send the .pub to the SuperLink host). "
        "Otherwise: checks the TLS connection to --superlink (a name mismatch is reported "
        "with the name dialed and the names the certificate has), starts the SuperNode and "
        "waits until the SuperLink accepted it; it keeps running until stopped.")
    nh.add_argument("--superlink", metavar="HOST:PORT",
                    help="the SuperLink host's Fleet proxy (its --listen address)")
    nh.add_argument("--ca", metavar="FILE", help="the SuperLink host's ca.crt")
    nh.add_argument("--key", metavar="FILE",
                    help="this node's private key (default <work-dir>/supernode-key)")
    nh.add_argument("--check", action="store_true",
                    help="only check the TLS connection to --superlink with --ca, then exit")
    nh.add_argument("--make-key", action="store_true",
                    help="make the key pair (if missing), print the next step, exit")
    nh.add_argument("--node-config", default="", metavar="'K=V ...'",
                    help="partition-id=I num-partitions=N [tier=T] [data-dir=\"DIR\"]")
    nh.add_argument("--data-dir", help="this node's data folder (node-config data-dir)")
    nh.add_argument("--runtime-port", type=int,
                    help="the SuperNode's Runtime API port on 127.0.0.1 (default: a free one)")
    nh.add_argument("--join-timeout", type=float, default=120.0)
    nh.add_argument("--work-dir", default=str(state_dir("node-host")),
                    help="FLWR_HOME, key, logs (default %(default)s)")
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
    if args.cmd == "node-host":
        return node_host_main(args)
    if args.cmd == "superlink-host":
        return superlink_host_main(args, light=light)
    try:
        rc, work = prepare(args, light=light)
    except (ConfigError, ValueError, OSError) as err:
        print(f"fedlora: refused: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    try:
        res, run_dir = _launch(args, rc, work)
    except ValueError as err:  # refused before a daemon started (e.g. certificates' folder)
        print(f"fedlora: refused: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
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
    return text if isinstance(err, (ValueError, TLSCheckError)) else \
        f"{type(err).__name__}: {text}"


def prepare(args: argparse.Namespace, light: bool = False) -> tuple[dict[str, Any], Path]:
    """The checked run config and the work folder of ``sim``/``deploy``, before anything is
    created: the whole config (:func:`fedlora.validate.check`, relative paths against this
    directory), the node counts, and ``--work-dir``/``run-name`` (a deployment's folder is
    ``<work-dir>/<run-name>``, which must stay inside ``--work-dir``)."""
    from .config import RunConfig
    from .validate import check

    if args.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
    if args.cmd == "sim" and not (isinstance(args.cpus_per_node, int) and args.cpus_per_node >= 1
                                  and args.gpus_per_node >= 0):
        raise ValueError("--cpus-per-node must be an integer >= 1 (Flower 1.41's "
                         "client-resources-num-cpus) and --gpus-per-node >= 0, got "
                         f"{args.cpus_per_node!r} and {args.gpus_per_node!r}")
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
    check_eval_data(rc)  # the ServerApp's test split, on this (the SuperLink's) host
    cfg = RunConfig.from_run_config(dict(rc))
    if args.cmd == "sim" and cfg.task == "causal-lm" and cfg.partitioner == "natural":
        from .tasks import lm_data  # a simulation has one partition per node

        try:
            lm_data.check_natural(cfg.data_dir, cfg.partition_column, args.nodes)
        except lm_data.DataError as err:
            raise ValueError(str(err)) from None
    base = Path(args.work_dir).expanduser().resolve()
    if base.exists() and not base.is_dir():
        raise ValueError(f"--work-dir {str(base)!r} is not a folder")
    if args.cmd in ("sim", "superlink-host"):
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
