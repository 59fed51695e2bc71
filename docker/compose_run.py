#!/usr/bin/env python3
"""Run a compose file with plain ``docker run`` (no Compose needed), host networking only.

    python docker/compose_run.py -f docker/compose.yml [-f docker/compose.tls.yml] \\
        [-p PROJECT] up | down | ps | logs [SERVICE...] | config

For machines without ``docker compose`` (air-gapped hosts with only the engine, CI). It reads the
same compose files and does what Compose would for the subset fedlora's files use:

- files are merged like Compose does (later files override: mappings merge, ``command`` /
  ``entrypoint`` are replaced, ``environment`` merges by name, ``volumes`` by container path);
- ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}`` and ``$$`` are
  substituted from the environment (and a ``.env`` file beside the first compose file);
- relative host paths of volumes are relative to the first compose file's folder;
- services start in ``depends_on`` order as ``<project>-<service>-1`` with Compose's labels, so
  ``docker ps --filter label=com.docker.compose.project=<project>`` finds them;
- ``deploy.resources.reservations.devices`` with the nvidia driver becomes ``--gpus``.

Every service must say ``network_mode: host``: this driver never creates or joins a Docker
network. Keys it does not know are refused rather than ignored.

Why not Compose itself: the Compose v2 plugin (``docker compose``) is not in the Debian registry
these machines can reach, and Debian's ``docker-compose`` package is Compose v1 (1.29.2), which
upstream stopped maintaining in 2023 and which has not been validated against the engine used
here (with the plugin, ``docker compose -f docker/compose.yml up`` is meant to read the same
files; not tested on these machines).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

SERVICE_KEYS = {
    "image", "entrypoint", "command", "environment", "volumes", "network_mode", "user",
    "restart", "stop_signal", "stop_grace_period", "depends_on", "deploy", "working_dir",
    "container_name", "labels", "init", "shm_size", "ulimits", "healthcheck",
}
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class ComposeError(RuntimeError):
    pass


# ------------------------------------------------------------------------------- the model


def read_dotenv(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            k, v = line.split("=", 1)
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
                v = v[1:-1]
            out[k.strip()] = v
    return out


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution on every string value (keys are left alone)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if val is not None else arg
        if op in (":?", "?"):
            if (op == ":?" and not val) or val is None:
                raise ComposeError(f"variable {name} is required: {arg}")
            return val
        return val or ""

    return _VAR.sub(sub, value)


def _as_env_dict(env: Any) -> dict[str, str | None]:
    if env is None:
        return {}
    if isinstance(env, dict):
        return {k: None if v is None else str(v) for k, v in env.items()}
    out: dict[str, str | None] = {}
    for item in env:
        k, sep, v = str(item).partition("=")
        out[k] = v if sep else None
    return out


def _volume_target(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("target"))
    parts = str(v).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def merge_service(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if k == "environment":
            out[k] = {**_as_env_dict(base.get(k)), **_as_env_dict(v)}
        elif k == "volumes":
            vols = {_volume_target(x): x for x in base.get(k) or []}
            vols.update({_volume_target(x): x for x in v or []})
            out[k] = list(vols.values())
        elif k == "depends_on":
            deps = _deps(base.get(k)) + [d for d in _deps(v) if d not in _deps(base.get(k))]
            out[k] = deps
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            out[k] = _deep_merge(base[k], v)
        else:
            out[k] = v
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def _deps(d: Any) -> list[str]:
    if not d:
        return []
    return list(d.keys()) if isinstance(d, dict) else [str(x) for x in d]


def load(files: Iterable[Path], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merged, interpolated ``services`` of the compose files, with the project directory."""
    files = [Path(f).resolve() for f in files]
    if not files:
        raise ComposeError("no compose file given")
    project_dir = files[0].parent
    env = {**read_dotenv(project_dir / ".env"), **(environ if environ is not None else os.environ)}
    services: dict[str, dict] = {}
    for f in files:
        doc = yaml.safe_load(f.read_text()) or {}
        for k in doc:
            if k not in ("services", "version", "name") and not str(k).startswith("x-"):
                raise ComposeError(f"{f}: top-level key {k!r} is not supported here")
        for name, svc in (interpolate(doc.get("services") or {}, env)).items():
            svc = svc or {}
            services[name] = merge_service(services.get(name, {}), svc)
    for name, svc in services.items():
        unknown = set(svc) - SERVICE_KEYS
        if unknown:
            raise ComposeError(f"service {name}: keys not supported here: {sorted(unknown)}")
        if svc.get("network_mode") != "host":
            raise ComposeError(f"service {name}: needs network_mode: host "
                               "(this driver never uses a Docker network)")
        if not svc.get("image"):
            raise ComposeError(f"service {name}: no image")
        for d in _deps(svc.get("depends_on")):
            if d not in services:
                raise ComposeError(f"service {name} depends on unknown service {d}")
    return {"project_dir": project_dir, "services": services}


def start_order(services: Mapping[str, dict]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ComposeError(f"depends_on cycle at {n}")
        state[n] = 1
        for d in _deps(services[n].get("depends_on")):
            visit(d)
        state[n] = 2
        order.append(n)

    for n in services:
        visit(n)
    return order


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        import shlex
        return shlex.split(v)
    return [str(x) for x in v]


def _duration_s(v: Any) -> int:
    if isinstance(v, (int, float)):
        return int(v)
    m = re.fullmatch(r"\s*(?:(\d+)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", str(v))
    if not m:
        raise ComposeError(f"duration {v!r} not understood")
    return int(int(m.group(1) or 0) * 60 + float(m.group(2) or 0))


def container_name(project: str, service: str, svc: Mapping[str, Any]) -> str:
    return svc.get("container_name") or f"{project}-{service}-1"


def run_args(project: str, name: str, svc: Mapping[str, Any], project_dir: Path) -> list[str]:
    """``docker run`` arguments (after ``docker``) for one service."""
    args = ["run", "-d", "--name", container_name(project, name, svc), "--network", "host",
            "--label", f"{PROJECT_LABEL}={project}", "--label", f"{SERVICE_LABEL}={name}"]
    labels = svc.get("labels") or {}
    for k, v in (labels.items() if isinstance(labels, dict) else
                 (str(x).partition("=")[::2] for x in labels)):
        args += ["--label", f"{k}={v}"]
    entry = _as_list(svc.get("entrypoint"))
    command = _as_list(svc.get("command"))
    if entry:
        args += ["--entrypoint", entry[0]]
        command = entry[1:] + command
    if svc.get("user") not in (None, ""):
        args += ["--user", str(svc["user"])]
    if svc.get("working_dir"):
        args += ["--workdir", str(svc["working_dir"])]
    for k, v in _as_env_dict(svc.get("environment")).items():
        args += ["-e", k if v is None else f"{k}={v}"]
    for v in svc.get("volumes") or []:
        args += ["-v", _volume_arg(v, project_dir)]
    if svc.get("restart"):
        args += ["--restart", str(svc["restart"])]
    if svc.get("stop_signal"):
        args += ["--stop-signal", str(svc["stop_signal"])]
    if svc.get("stop_grace_period") is not None:
        args += ["--stop-timeout", str(_duration_s(svc["stop_grace_period"]))]
    if svc.get("init"):
        args += ["--init"]
    if svc.get("shm_size"):
        args += ["--shm-size", str(svc["shm_size"])]
    gpus = _gpus(svc.get("deploy") or {})
    if gpus:
        args += ["--gpus", gpus]
    return args + [str(svc["image"])] + command


def _volume_arg(v: Any, project_dir: Path) -> str:
    if isinstance(v, dict):
        src, dst = v.get("source"), v.get("target")
        mode = ":ro" if v.get("read_only") else ""
        v = f"{src}:{dst}{mode}" if src else str(dst)
    parts = str(v).split(":")
    if len(parts) >= 2:
        src = parts[0]
        if src.startswith((".", "~")) or "/" in src:
            src = str((project_dir / Path(src).expanduser()).resolve())
        parts[0] = src
    return ":".join(parts)


def _gpus(deploy: Mapping[str, Any]) -> str | None:
    devices = (((deploy.get("resources") or {}).get("reservations") or {}).get("devices")) or []
    for d in devices:
        if d.get("driver", "nvidia") == "nvidia" and "gpu" in (d.get("capabilities") or []):
            if d.get("device_ids"):
                return "device=" + ",".join(map(str, d["device_ids"]))
            count = d.get("count", "all")
            return "all" if str(count) == "all" else str(count)
    return None


# ------------------------------------------------------------------------------- commands


def docker_cmd() -> list[str]:
    import shlex
    return shlex.split(os.environ.get("DOCKER", "docker"))


def _docker(args: list[str], check: bool = True, capture: bool = False
            ) -> subprocess.CompletedProcess:
    res = subprocess.run(docker_cmd() + args, text=True,
                         capture_output=capture, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        err = (res.stderr or "").strip() if capture else ""
        raise ComposeError(f"docker {' '.join(args[:3])}... failed ({res.returncode}) {err}")
    return res


def project_containers(project: str) -> list[str]:
    res = _docker(["ps", "-a", "-q", "--filter", f"label={PROJECT_LABEL}={project}"],
                  capture=True)
    return res.stdout.split()


def up(model: Mapping[str, Any], project: str, services: list[str] | None = None) -> list[str]:
    svcs = model["services"]
    started = []
    wanted = set(services or svcs)
    for name in start_order(svcs):
        if name not in wanted:
            continue
        args = run_args(project, name, svcs[name], model["project_dir"])
        cname = container_name(project, name, svcs[name])
        _docker(["rm", "-f", cname], check=False, capture=True)
        print(f"[compose_run] {cname}: docker {' '.join(args[args.index(svcs[name]['image']):])}",
              flush=True)
        _docker(args, capture=True)
        started.append(cname)
    return started


def down(project: str, grace: int = 10) -> list[str]:
    ids = project_containers(project)
    if ids:
        _docker(["stop", "-t", str(grace), *ids], check=False, capture=True)
        _docker(["rm", "-f", "-v", *ids], check=False, capture=True)
    return ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-f", "--file", action="append", default=[],
                    help="compose file (repeatable; default docker/compose.yml)")
    ap.add_argument("-p", "--project-name",
                    default=os.environ.get("COMPOSE_PROJECT_NAME", "fedlora"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start the services (detached), in depends_on order")
    p_up.add_argument("services", nargs="*")
    sub.add_parser("down", help="stop and remove the project's containers")
    sub.add_parser("ps", help="list the project's containers")
    p_logs = sub.add_parser("logs", help="print the services' logs")
    p_logs.add_argument("services", nargs="*")
    sub.add_parser("config", help="print the merged, interpolated services")
    a = ap.parse_args(argv)
    files = a.file or [str(Path(__file__).resolve().parent / "compose.yml")]
    try:
        if a.cmd == "down":
            down(a.project_name)
            return 0
        if a.cmd == "ps":
            return _docker(["ps", "-a", "--filter", f"label={PROJECT_LABEL}={a.project_name}"],
                           check=False).returncode
        model = load(files)
        if a.cmd == "config":
            yaml.safe_dump({"services": model["services"]}, sys.stdout, sort_keys=False)
        elif a.cmd == "up":
            up(model, a.project_name, a.services or None)
        elif a.cmd == "logs":
            for name in a.services or start_order(model["services"]):
                cname = container_name(a.project_name, name, model["services"][name])
                print(f"===== {cname}", flush=True)
                _docker(["logs", cname], check=False)
        return 0
    except ComposeError as e:
        print(f"compose_run: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
