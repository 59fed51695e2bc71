"""What code and software produced a run: run.json's ``provenance`` (written by the ServerApp).

* ``code.source_sha256``: sha256 over ``fedlora/**/*.py`` (sorted relative paths, each path and
  its bytes), computed by the ServerApp over the files it runs: the FAB ships exactly these
  (``fab-include``), so the launcher's checkout and the ServerApp agree when the code is the same.
* ``code.git_commit``/``git_dirty``: the launcher's git checkout (the FAB has no ``.git``); the
  launcher passes them with its own source hash in :data:`ENV` (``launcher_env``), and the
  ServerApp keeps them only with ``git_matches_code`` = whether the hashes agree. ``git_dirty``:
  uncommitted or untracked changes under ``fedlora/`` or in ``pyproject.toml``.
* ``versions``: python, fedlora and flwr/torch/numpy/peft/transformers (importlib.metadata).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

ENV = "FEDLORA_LAUNCHER_PROVENANCE"
PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGES = ("flwr", "torch", "numpy", "peft", "transformers")


def source_sha256(package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 of every ``*.py`` under ``package_dir`` (``__pycache__`` has none), each as its
    path relative to the package's parent (``fedlora/x.py``), a NUL, its bytes, a NUL."""
    h = hashlib.sha256()
    root = package_dir.parent
    for path in sorted(package_dir.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def git_state(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """``{"git_commit": sha, "git_dirty": bool}`` of the checkout holding ``package_dir``; {}
    outside a git checkout (or without git)."""
    root = package_dir.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return {}
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=all", "--",
                    package_dir.name, "pyproject.toml")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": bool(dirty)}


@functools.lru_cache(maxsize=1)
def launcher_env() -> str:
    """The JSON the launcher puts in :data:`ENV` for the ServerApp: its checkout's git state
    and source hash."""
    return json.dumps({**git_state(), "source_sha256": source_sha256()}, sort_keys=True)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("fedlora", *PACKAGES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_version(env: Mapping[str, str] | None = None,
                 package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """The ``code`` entry: the source hash of ``package_dir`` (the code this process runs), and
    the launcher's git state from :data:`ENV` (else the checkout's own, when ``package_dir`` is
    in one) with whether it describes this code."""
    env = os.environ if env is None else env
    own = source_sha256(package_dir)
    out: dict[str, Any] = {"source_sha256": own}
    try:
        launcher = json.loads(env.get(ENV) or "{}")
    except ValueError:
        launcher = {}
    git = ({k: launcher[k] for k in ("git_commit", "git_dirty") if k in launcher}
           if isinstance(launcher, dict) else {})
    if git:
        out.update(git, git_matches_code=launcher.get("source_sha256") == own)
    else:
        local = git_state(package_dir)
        if local:
            out.update(local, git_matches_code=True)
    return out


def record(wire: str, payload_format: int, device: str, threads: int) -> dict[str, Any]:
    """run.json's ``provenance``."""
    return {"code": code_version(), "versions": versions(),
            "server": {"device": device, "torch_threads": threads},
            "wire": wire, "payload_format": payload_format}
