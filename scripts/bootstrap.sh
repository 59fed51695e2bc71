#!/usr/bin/env bash
# Create .venv with the pinned dependencies (once; again when pyproject.toml changes) and make
# sure the offline default dataset is there. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.fedlora-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing pinned dependencies into .venv (about 2 minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: the CPU wheel; nothing may pull a newer (CUDA) torch afterwards.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[bootstrap] installing Debian package dataset-fashion-mnist (the default dataset)"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "[bootstrap] the default dataset needs: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
# nginx: the Fleet proxy in front of the SuperLink in the default (secure) deployment
# (fedlora.launch deploy, tests/test_deployment.py). Debian's package; its postinst may start a
# default site on port 80 where services run (not in containers with policy-rc.d).
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[bootstrap] installing Debian package nginx (Fleet proxy of the secure deployment)"
    { apt-get install -y -q --no-install-recommends nginx >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends nginx >/dev/null; }; } \
      || echo "[bootstrap] could not install nginx: the secure deployment and its tests cannot run" >&2
  else
    echo "[bootstrap] the secure deployment (Fleet proxy) needs: sudo apt-get install nginx" >&2
  fi
fi
