"""Check a whole run config before anything runs: the launcher calls :func:`check` before it
starts any Flower process, the ServerApp calls it again first thing (a config may also arrive by
``flwr run .``), so both refuse the same configs with the same one-line :class:`ConfigError`.

Checked: unknown keys (named with the closest valid key), types, ranges and choices, every codec
spec (with its key), the method × task × dataset × upload/download combinations the strategies
refuse at start, ``dp-*`` against the method, ``run-name`` (one folder name), and folders that
must exist: ``data-dir``, ``resume``, a path-like text ``model`` (never sent to the hub).
Relative ``data-dir``/``run-dir``/``resume``/local ``model`` resolve against ``cwd`` (the
caller's directory): :func:`check` returns the config with them absolute.

Cheap: numpy and fedlora.compression, never torch or numba (``light=True`` parses codec specs
without importing torch at all; for the launcher's own process, which never encodes).
A table here mirrors what the strategy classes declare; tests/test_validate.py keeps them equal.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import sys
import types
from pathlib import Path
from typing import Any, Iterator, Mapping

from .config import RunConfig, split_list
from .strategies.protocol import Uploads

__all__ = ["ConfigError", "check", "check_run_name", "run_folder"]


class ConfigError(ValueError):
    """A run config refused before the run starts; the message is one line naming the key."""


# --- what the strategies declare (tests/test_validate.py compares with the classes) -----------
#: weight-averaging methods: ``upload=delta`` allowed, robust aggregation allowed
DELTA_UPLOAD = ("fedavg", "flocora", "fl-lora", "ffa-lora")
#: methods whose replies are updates already
NATIVE_DELTA = ("flasc", "lora-a2")


def uploads_of(method: str) -> Uploads:
    """The method's :class:`~.strategies.protocol.Uploads`, from the two tables above."""
    return (Uploads.EITHER if method in DELTA_UPLOAD else
            Uploads.UPDATES if method in NATIVE_DELTA else Uploads.WEIGHTS)


#: methods that add their own sparsifier: (to uploads, to downloads; "delta" = with download=delta)
OWN_SPARSIFIER = {"flasc": (True, True), "flexlora": (True, False), "hetlora": (True, False),
                  "lora-a2": (True, "delta")}
VISION_MODELS = ("resnet8", "resnet18")
VISION_DATASETS = ("fashion-mnist", "cifar10", "npz")
TEXT_DEFAULT = 'dataset="bbc-news" model="minilm" (both bundled)'

CHOICES = {
    "client-sampling": ("partition", "flower"),
    "task": ("vision", "text", "causal-lm"),
    "norm": ("group", "batch"),
    "partitioner": ("iid", "dirichlet", "pathological", "natural"),
    "data-format": ("auto", "alpaca", "chat", "text"),
    "quantize": ("none", "4bit", "8bit"),
    "lr-schedule": ("constant", "cosine"),
    "upload": ("weights", "delta"),
    "download": ("full", "delta"),
    "payload-table": ("digest", "names"),
    "norm-bound-action": ("clip", "reject"),
    "aggregation": ("mean", "median", "trimmed-mean"),
    "server-opt": ("adamw", "sgd", "avg"),
    "flasc-freeze": ("none", "client", "server"),
    "aggregation-mode": ("sync", "async"),
    "staleness-weight": ("sqrt", "constant"),
    "async-order": ("arrival", "simulated"),
}

# key: (low, high, low inclusive, high inclusive); None = unbounded
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "num-server-rounds": (1, None, True, False),
    "fraction-train": (0, 1, False, True),
    "min-train-nodes": (1, None, True, False),
    "min-available-nodes": (1, None, True, False),
    "round-timeout": (0, None, False, False),
    "seed": (0, 2**32 - 1, True, True),
    "feature-maps": (1, None, True, False),
    "lora-rank": (1, None, True, False),
    "lora-alpha": (0, None, True, False),
    "max-length": (2, None, True, False),
    "dirichlet-alpha": (0, None, False, False),
    "classes-per-partition": (1, None, True, False),
    "max-examples-per-client": (0, None, True, False),
    "eval-max-examples": (0, None, True, False),
    "eval-every": (1, None, True, False),
    "local-epochs": (1, None, True, False),
    "batch-size": (1, None, True, False),
    "lr": (0, None, False, False),
    "momentum": (0, 1, True, False),
    "weight-decay": (0, None, True, False),
    "client-threads": (1, None, True, False),
    "delta-max-nodes": (1, None, True, False),
    "max-weight-ratio": (0, None, True, False),
    "update-norm-bound": (0, None, True, False),
    "norm-bound-factor": (0, None, True, False),
    "norm-bound-history": (0, None, True, False),
    "norm-bound-global": (0, None, True, False),
    "min-partition-size": (0, None, True, False),
    "trim-fraction": (0, 0.5, True, False),
    "density-down": (0, 1, False, True),
    "density-up": (0, 1, False, True),
    "density-decay": (0, None, False, False),
    "density-decay-rounds": (1, None, True, False),
    "server-lr": (0, None, False, False),
    "server-weight-decay": (0, None, True, False),
    "rank-budget": (1, None, True, False),
    "lr-b-ratio": (0, None, False, False),
    "score-epochs": (0, None, True, False),
    "hetlora-gamma": (0, 1, False, True),
    "keep-checkpoints": (0, None, True, False),
    "secagg-bits": (2, 24, True, True),
    "secagg-neighbours": (0, None, True, False),
    "secagg-threshold": (0.5, 1, True, False),
    "secagg-density": (0, 1, False, True),
    "secagg-noise": (0, None, True, False),
    "generate-prompts": (0, None, True, False),
    "generate-max-new-tokens": (1, None, True, False),
    "buffer-size": (1, None, True, False),
    "concurrency": (0, None, True, False),
    "staleness-limit": (0, None, True, False),
    "straggler-fraction": (0, 1, True, True),
    "straggler-slowdown": (1, None, True, False),
    "simulated-round-timeout": (0, None, True, False),
}

CODEC_KEYS = ("codec-up", "codec-down", "codec-down-full", "tier-codec-up", "tier-codec-down")


def check(run_config: Mapping[str, Any], cwd: str | Path | None = None,
          light: bool = False, hub_offline: bool = False) -> dict[str, Any]:
    """``run_config`` (overrides or a full config) checked; returns it with relative paths made
    absolute against ``cwd`` (default: this process's directory). ConfigError otherwise.
    ``hub_offline``: the run's processes will have the Hugging Face hub switched off (the
    launcher's default), so a dataset without ``data-dir`` that only the hub has is refused."""
    base = Path(cwd if cwd is not None else os.getcwd())
    out = dict(run_config)
    known = RunConfig.keys()
    for key in out:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown run-config key {key!r}{hint}")
    try:
        cfg = RunConfig.from_run_config(out)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key.replace("-", "_"))
        if value not in allowed:
            raise ConfigError(f"run-config {key!r} must be one of {list(allowed)}, got {value!r}")
    for key, bounds in RANGES.items():
        _check_range(key, getattr(cfg, key.replace("-", "_")), *bounds)
    _check_method(cfg)
    _check_device(cfg.device)
    _check_tiers(cfg)
    pipes = _check_codecs(cfg, light)
    _check_combinations(cfg, pipes)
    _check_privacy(cfg)
    _check_secure(cfg)
    _check_async(cfg)
    check_run_name(cfg.run_name)
    for key in ("run-dir", "data-dir", "resume"):
        value = str(out.get(key, getattr(cfg, key.replace("-", "_"))))
        if value and not (key == "resume" and value == "auto"):
            path = _absolute(value, base)
            if key in out or value != known[key]:
                out[key] = str(path)
    cfg = RunConfig.from_run_config(out)
    _check_task(cfg, out, base)
    _check_folders(cfg)
    if hub_offline and not cfg.data_dir:
        _check_offline(cfg)
    return out


def check_eval_data(run_config: Mapping[str, Any]) -> None:
    """The ServerApp's central evaluation reads the test split of run-config ``data-dir`` on the
    SuperLink's host (the nodes read their train split from their own node config): refuse a
    vision run whose ``data-dir`` holds no test split there, before any Flower process starts.
    ``run_config`` is :func:`check`'s output (absolute paths)."""
    cfg = RunConfig.from_run_config(dict(run_config))
    if cfg.task != "vision" or not cfg.data_dir:
        return
    from .tasks.data import DataError, _detect_dir_format  # numpy only

    try:
        _detect_dir_format(Path(cfg.data_dir), "test")
    except DataError as err:
        raise ConfigError(f"run-config 'data-dir' is the central evaluation's folder on the "
                          f"SuperLink's host: {err}") from None


def check_run_name(name: str) -> None:
    """``run-name`` must be one plain folder name: ``../x``, ``/tmp/x``, ``a/b`` could put a run
    (and a deployment's keys and logs) outside its folder."""
    if not name:
        return
    bad = (name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute()
           or len(name) > 200 or name != name.strip())
    if bad:
        raise ConfigError(f"run-config 'run-name' must be one folder name (no '/', '..' or "
                          f"leading/trailing spaces), got {name!r}")


def run_folder(run_config: Mapping[str, Any]) -> Path:
    """Where the ServerApp writes this run's records: the ``resume`` folder when it names one,
    else ``run-dir``/``run-name`` (as :func:`fedlora.server_app.resolve_run_dir`)."""
    cfg = RunConfig.from_run_config(run_config)
    if cfg.resume and cfg.resume != "auto":
        return Path(cfg.resume).expanduser().resolve()
    return Path(cfg.run_dir).expanduser().resolve() / cfg.run_name


# ------------------------------------------------------------------------------------ checks


def _check_range(key: str, value: float, low, high, low_in: bool, high_in: bool) -> None:
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_in else value > low
    if ok and high is not None:
        ok = value <= high if high_in else value < high
    if not ok:
        left = "-inf" if low is None else f"{'[' if low_in else '('}{low:g}"
        right = "inf)" if high is None else f"{high:g}{']' if high_in else ')'}"
        raise ConfigError(f"run-config {key!r} must be in {left}, {right}, got {value!r}")


def _check_method(cfg: RunConfig) -> None:
    from .methods import METHODS  # the package's __init__ only: no torch

    if cfg.method not in METHODS:
        close = difflib.get_close_matches(cfg.method, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"run-config 'method' must be one of {sorted(METHODS)}, got "
                          f"{cfg.method!r}{hint}")


def _check_device(spec: str) -> None:
    s = str(spec).strip().lower()
    if s in ("auto", "cpu", "cuda") or (s.startswith("cuda:") and s[5:].isdigit()):
        return
    raise ConfigError(f"run-config 'device' must be auto, cpu, cuda or cuda:N, got {spec!r}")


def _check_tiers(cfg: RunConfig) -> None:
    def numbers(key: str, kind: type, ok, what: str) -> None:
        for item in split_list(getattr(cfg, key.replace("-", "_"))):
            try:
                v = kind(item)
            except ValueError:
                raise ConfigError(f"run-config {key!r}: {item!r} is not {what}") from None
            if not ok(v):
                raise ConfigError(f"run-config {key!r}: {item!r} is not {what}")

    numbers("tier-map", int, lambda v: v >= 0, "a tier number >= 0")
    numbers("tier-density", float, lambda v: 0 < v <= 1, "a density in (0, 1]")
    numbers("tier-rank", int, lambda v: v >= 1, "a rank >= 1")


@contextlib.contextmanager
def _torch_hidden() -> Iterator[None]:
    """``import torch`` fails inside (fedlora.compression then uses its numpy paths)."""
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def _parser(light: bool):
    if light and "fedlora.compression" not in sys.modules and "torch" not in sys.modules:
        with _torch_hidden():
            import fedlora.compression  # noqa: F401
    from .compression import SpecError, parse_spec

    return parse_spec, SpecError


def _check_codecs(cfg: RunConfig, light: bool) -> dict[str, list]:
    parse_spec, spec_error = _parser(light)
    pipes: dict[str, list] = {}
    for key in CODEC_KEYS:
        value = getattr(cfg, key.replace("-", "_"))
        specs = split_list(value) if key.startswith("tier-") else ([value] if value else [])
        if key in ("codec-up", "codec-down") and not value:
            raise ConfigError(f"run-config {key!r} is empty (a codec spec, e.g. 'fp32')")
        try:
            pipes[key] = [parse_spec(s) for s in specs]
        except (spec_error, ValueError) as err:
            raise ConfigError(f"run-config {key!r}: {err}") from None
    return pipes


def _check_combinations(cfg: RunConfig, pipes: dict[str, list]) -> None:
    m = cfg.method
    if cfg.upload == "delta" and m not in DELTA_UPLOAD + NATIVE_DELTA:
        raise ConfigError(f"{m} aggregates client weights; upload='delta' is for "
                          f"{', '.join(DELTA_UPLOAD)}")
    deltas_up = m in NATIVE_DELTA or (m in DELTA_UPLOAD and cfg.upload == "delta")
    ups = pipes["codec-up"] + pipes["tier-codec-up"]
    downs = pipes["codec-down"] + pipes["tier-codec-down"]
    full = pipes["codec-down-full"][0] if pipes["codec-down-full"] else None
    for pipe in ups:
        if pipe.for_updates_only and not deltas_up:
            raise ConfigError(f"codec-up {pipe.spec!r} encodes updates, not weights: use "
                              f"upload='delta' ({m} uploads weights otherwise)")
    if full is not None and full.for_updates_only:
        raise ConfigError(f"codec-down-full {full.spec!r} carries weights (a full download); "
                          "it encodes updates only")
    for pipe in downs:
        if pipe.for_updates_only and cfg.download != "delta":
            raise ConfigError(f"codec-down {pipe.spec!r} encodes updates, not weights: use "
                              "download='delta' (a full download carries the weights)")
        if pipe.for_updates_only and (full or pipe.with_sparsifier(None)).for_updates_only:
            raise ConfigError(f"codec-down {pipe.spec!r} encodes updates, not weights: set "
                              "codec-down-full (the codec of a full download, e.g. "
                              "'affine:8|zstd')")
    up, down = OWN_SPARSIFIER.get(m, (False, False))
    down = down is True or (down == "delta" and cfg.download == "delta")
    for pipe in (ups if up else []) + (downs if down else []):
        if pipe.value_coder.whole_body:  # drive, eden: one rotation of the whole update
            raise ConfigError(f"{m} adds its own sparsifier, and codec spec {pipe.spec!r} codes "
                              "the whole update at once (it cannot follow a sparsifier): use "
                              "another value coder (e.g. 'sign', 'affine:2') with this method")
        if pipe.sparsifier is not None:
            raise ConfigError(f"{m} adds its own sparsifier: codec spec {pipe.spec!r} must not "
                              "sparsify")
    if m == "flasc" and cfg.download == "delta":
        raise ConfigError("flasc sends its own sparse download (top-k of the weights at "
                          "density-down); download='delta' is for the other methods")
    if cfg.download_init and cfg.download != "delta":
        raise ConfigError("download-init=true starts a node's copy at the initial adapter: it "
                          "needs download='delta'")
    if cfg.aggregation != "mean" and m not in DELTA_UPLOAD:
        raise ConfigError(f"aggregation={cfg.aggregation!r} applies to the weight-averaging "
                          f"methods ({', '.join(DELTA_UPLOAD)}); {m} does not average uploads, "
                          "use aggregation='mean'")


def _check_privacy(cfg: RunConfig) -> None:
    from .privacy import ServerPrivacy  # numpy only

    m = cfg.method
    traits = types.SimpleNamespace(
        cfg=cfg, name=m, uploads=uploads_of(m),
        replies_are_deltas=uploads_of(m).replies_are_deltas(cfg.upload))
    try:
        ServerPrivacy.for_strategy(traits)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_async(cfg: RunConfig) -> None:
    """``aggregation-mode=async`` (fedlora/strategies/buffered.py): the FedBuff step adds a
    weighted mean of updates, so only the weight-averaging methods with ``upload=delta``; no
    secure aggregation (its masks need a fixed cohort per round). Without real time
    (``straggler-sleep=false``) only ``async-order=simulated`` has a meaningful order, and the
    simulated round timeout is the sync loop's."""
    if cfg.aggregation_mode != "async":
        return
    if not cfg.straggler_sleep and cfg.async_order != "simulated":
        raise ConfigError("straggler-sleep=false with aggregation-mode='async' needs "
                          "async-order='simulated' (without real time the arrival order means "
                          "nothing)")
    if cfg.simulated_round_timeout > 0:
        raise ConfigError("simulated-round-timeout is for aggregation-mode='sync' (async "
                          "steps on the first buffer-size replies; round-timeout bounds a task)")
    if cfg.method not in DELTA_UPLOAD:
        raise ConfigError(f"aggregation-mode='async' needs a method whose server step is a "
                          f"weighted mean of updates ({', '.join(DELTA_UPLOAD)} with "
                          f"upload='delta'), not {cfg.method}")
    if cfg.upload != "delta":
        raise ConfigError(f"aggregation-mode='async' adds stale updates to the current global: "
                          f"set upload='delta' ({cfg.method} uploads weights otherwise)")
    if cfg.secure_aggregation:
        raise ConfigError("aggregation-mode='async' does not support secure-aggregation (its "
                          "masks need one fixed cohort per round)")


def _check_secure(cfg: RunConfig) -> None:
    from .secagg.settings import check_config  # the strategy's own check (no Flower)

    try:
        check_config(cfg, cfg.method)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _looks_like_path(model: str) -> bool:
    """A local folder, not a hub id (``name`` or ``org/name``)."""
    return (model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1
            or model.endswith("/"))


def _check_task(cfg: RunConfig, out: dict[str, Any], base: Path) -> None:
    from .tasks import text_data  # numpy only

    dataset = cfg.dataset.strip().lower()
    text_names = set(text_data.SUBDIRS) | set(text_data.ALIASES) | set(text_data.HUB)
    if cfg.partitioner == "natural" and cfg.task != "causal-lm":
        raise ConfigError("partitioner 'natural' (by a user/author column) is for "
                          "task='causal-lm'")
    if cfg.task == "causal-lm":
        _check_causal(cfg, out, base)
        return
    if cfg.quantize != "none":
        raise ConfigError(f"quantize={cfg.quantize!r} is for task='causal-lm'")
    for key in ("gradient-checkpointing", "packing", "generate-prompts"):  # else ignored
        if getattr(cfg, key.replace("-", "_")):
            raise ConfigError(f"run-config {key!r} is for task='causal-lm' (task is "
                              f"{cfg.task!r})")
    if cfg.task == "vision":
        if cfg.model not in VISION_MODELS:
            raise ConfigError(f"run-config 'model' must be one of {list(VISION_MODELS)} for "
                              f"task 'vision', got {cfg.model!r} (a text model? set "
                              "task=\"text\")")
        if dataset in text_names:
            raise ConfigError(f"dataset {cfg.dataset!r} is a text dataset; set task=\"text\" "
                              f"(task 'vision' takes {list(VISION_DATASETS)} or a data-dir)")
        if not cfg.data_dir and dataset not in ("fashion-mnist", "cifar10"):
            raise ConfigError(f"dataset {cfg.dataset!r} needs run-config 'data-dir' (a local "
                              "folder)")
        return
    if dataset in VISION_DATASETS or cfg.model in VISION_MODELS:
        raise ConfigError(f"task 'text' needs a text dataset and model, got dataset="
                          f"{cfg.dataset!r} model={cfg.model!r}: set {TEXT_DEFAULT}, or a "
                          "data-dir / local model folder")
    if not cfg.data_dir and text_data.canonical(dataset) not in (text_data.EMBEDDED,
                                                                 *text_data.HUB):
        raise ConfigError(f"text dataset {cfg.dataset!r} needs run-config 'data-dir' (a local "
                          f"folder); known without one: {text_data.EMBEDDED!r} (bundled), "
                          f"{sorted(text_data.HUB)} (hub)")
    model = cfg.model.strip()
    local = _absolute(model, base)
    if _looks_like_path(model) or (not Path(model).is_absolute() and local.is_dir()):
        if not local.is_dir():
            raise ConfigError(f"run-config 'model' {model!r} looks like a local folder and "
                              f"{str(local)!r} does not exist (a hub id is 'name' or "
                              "'org/name')")
        out["model"] = str(local)


def _check_causal(cfg: RunConfig, out: dict[str, Any], base: Path) -> None:
    """task='causal-lm': a local model folder (or a hub id when the hub is reachable), the data
    files read and every row checked (fedlora/tasks/lm_data.py, no tokenizer), a quantized
    base only where bitsandbytes can run."""
    from .tasks import lm_data  # numpy (+ pyarrow for parquet) only

    model = cfg.model.strip()
    if model.lower() in VISION_MODELS or model.lower() in ("", "minilm"):
        raise ConfigError(f"task 'causal-lm' needs run-config 'model' = a local Hugging Face "
                          f"causal-LM folder, got {cfg.model!r}")
    local = _absolute(model, base)
    if _looks_like_path(model) or local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"run-config 'model' {model!r}: {str(local)!r} is not a Hugging "
                              "Face model folder (no config.json)")
        out["model"] = str(local)
    if not cfg.data_dir:
        raise ConfigError("task 'causal-lm' needs run-config 'data-dir': a folder with "
                          "train.jsonl (or .jsonl.gz/.csv/.parquet; test.* optional)")
    needs_column = cfg.partitioner in ("dirichlet", "pathological", "natural")
    if needs_column and not cfg.partition_column:
        raise ConfigError(f"partitioner {cfg.partitioner!r} for task 'causal-lm' needs "
                          "run-config 'partition-column' (a category or user column)")
    if Path(cfg.data_dir).is_dir():
        try:
            lm_data.check_files(cfg.data_dir, cfg.data_format,
                                cfg.partition_column if needs_column else "")
        except lm_data.DataError as err:
            raise ConfigError(str(err)) from None
    if cfg.quantize != "none":
        if cfg.method == "fedavg":  # fedlora/tasks/causal.py: build_model refuses it too
            raise ConfigError(f"quantize={cfg.quantize!r}: a quantized base cannot be fully "
                              "fine-tuned (method 'fedavg'); use a LoRA method")
        _check_quantize(cfg)


def _check_quantize(cfg: RunConfig) -> None:
    """bitsandbytes' 4/8-bit layers run on CUDA only: refused on a CPU device, a machine without
    an NVIDIA driver, or without bitsandbytes (checked without importing torch)."""
    import importlib.util
    import shutil

    why = ""
    if str(cfg.device).strip().lower() == "cpu":
        why = "device='cpu'"
    elif not (Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi")):
        why = "this machine has no NVIDIA driver"
    elif importlib.util.find_spec("bitsandbytes") is None:
        why = "bitsandbytes is not installed (pip install 'fedlora[qlora]')"
    if why:
        raise ConfigError(f"quantize={cfg.quantize!r} needs a CUDA GPU with bitsandbytes; "
                          f"{why}: use quantize='none'")


def _check_folders(cfg: RunConfig) -> None:
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"run-config 'data-dir' {cfg.data_dir!r} is not a folder")
    if cfg.task == "vision" and not cfg.data_dir and cfg.dataset == "fashion-mnist":
        from .tasks.data import FASHION_MNIST_DIR

        if not Path(FASHION_MNIST_DIR).is_dir():
            raise ConfigError(f"dataset 'fashion-mnist' without data-dir reads "
                              f"{FASHION_MNIST_DIR}, which is missing (apt-get install "
                              "dataset-fashion-mnist, or set data-dir)")
    if cfg.resume and cfg.resume != "auto":
        ckpts = Path(cfg.resume) / "checkpoints"
        if not Path(cfg.resume).is_dir():
            raise ConfigError(f"run-config 'resume' {cfg.resume!r} is not a folder (a run "
                              "folder with checkpoints/, or 'auto')")
        if not ckpts.is_dir() or not any(ckpts.iterdir()):
            raise ConfigError(f"run-config 'resume' {cfg.resume!r} holds no checkpoints/ "
                              "(nothing to resume)")
    if cfg.resume == "auto" and not cfg.run_name:
        raise ConfigError("resume='auto' needs a fixed run-name (the run folder to continue)")


def _check_offline(cfg: RunConfig) -> None:
    from .tasks import text_data

    dataset = cfg.dataset.strip().lower()
    hub = (dataset == "cifar10" if cfg.task == "vision" else
           text_data.canonical(dataset) in text_data.HUB)
    if hub:
        raise ConfigError(f"dataset {cfg.dataset!r} without data-dir comes from the Hugging Face "
                          "hub, which is switched off (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE, on "
                          "by default): set run-config 'data-dir' to a local copy")


def _absolute(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).resolve()
