"""fedlora/validate.py: every class of bad config is refused with one line naming the key, the
launcher and the strategies refuse the same method/codec combinations, relative paths resolve
against the caller's directory, and the whole check stays cheap (no torch)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora import validate
from fedlora.config import RunConfig
from fedlora.validate import ConfigError, check

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = str(ROOT / "tests" / "data" / "fashion-mnist-sample")
OK = {"dataset": "npz", "data-dir": SAMPLE}


@pytest.mark.parametrize("overrides, says", [
    ({"num-server-round": 3}, "unknown run-config key 'num-server-round' (did you mean "
                              "'num-server-rounds'?)"),
    ({"codec_up": "fp32"}, "did you mean 'codec-up'"),
    ({"num-server-rounds": -1}, "'num-server-rounds' must be in [1, inf), got -1"),
    ({"num-server-rounds": 0}, "'num-server-rounds'"),
    ({"fraction-train": 0.0}, "'fraction-train' must be in (0, 1]"),
    ({"fraction-train": 1.5}, "'fraction-train'"),
    ({"lr": float("nan")}, "'lr'"),
    ({"trim-fraction": 0.5}, "'trim-fraction' must be in [0, 0.5)"),
    ({"seed": -3}, "'seed'"),
    ({"num-server-rounds": "five"}, "'num-server-rounds' must be int"),
    ({"augment": "yes"}, "'augment' must be true/false"),
    ({"method": "flocra"}, "did you mean 'flocora'?"),
    ({"partitioner": "random"}, "'partitioner' must be one of"),
    ({"device": "tpu"}, "'device' must be auto, cpu, cuda or cuda:N"),
    ({"codec-up": "affine:99"}, "run-config 'codec-up': bad stage 'affine:99'"),
    ({"codec-down": "zip"}, "run-config 'codec-down': unknown codec 'zip'"),
    ({"codec-down-full": "topk:2"}, "run-config 'codec-down-full'"),
    ({"tier-codec-up": "fp32,bogus"}, "run-config 'tier-codec-up': unknown codec 'bogus'"),
    ({"tier-codec-down": "fp16,affine:0"}, "run-config 'tier-codec-down'"),
    ({"codec-up": ""}, "'codec-up' is empty"),
    ({"tier-density": "0.5,2"}, "'tier-density': '2' is not a density"),
    ({"tier-map": "0,x"}, "'tier-map': 'x'"),
    ({"method": "flexlora", "upload": "delta"}, "upload='delta' is for"),
    ({"method": "flasc", "download": "delta"}, "download='delta' is for the other methods"),
    ({"method": "flasc", "codec-up": "topk:0.1"}, "flasc adds its own sparsifier"),
    ({"codec-up": "sign"}, "codec-up 'sign' encodes updates, not weights"),
    ({"codec-down": "sign"}, "use download='delta'"),
    ({"method": "hetlora", "aggregation": "median"}, "use aggregation='mean'"),
    ({"dp": "central"}, "set upload='delta'"),
    ({"dp": "central", "method": "hetlora"}, "needs a method whose server step adds up"),
    ({"run-name": "../x"}, "'run-name' must be one folder name"),
    ({"run-name": "/abs"}, "'run-name'"),
    ({"run-name": "a/b"}, "'run-name'"),
    ({"task": "text", "dataset": "fashion-mnist"}, "task 'text' needs a text dataset and model, got dataset='fashion-mnist' "
                       "model='resnet8': set dataset=\"bbc-news\" model=\"minilm\""),
    ({"task": "text", "dataset": "bbc-news"}, "model='resnet8'"),
    ({"model": "minilm"}, "for task 'vision'"),
    ({"dataset": "bbc-news", "data-dir": ""}, "is a text dataset; set task=\"text\""),
    ({"dataset": "npz", "data-dir": ""}, "dataset 'npz' needs run-config 'data-dir'"),
    ({"data-dir": "no/such/folder"}, "'data-dir'"),
    ({"task": "text", "dataset": "bbc-news", "model": "./no-model"},
     "'model' './no-model' looks like a local folder"),
    ({"task": "text", "dataset": "bbc-news", "model": "/nowhere/model"}, "does not exist"),
    ({"resume": "no/such/run"}, "'resume'"),
    ({"resume": "auto", "run-name": ""}, "resume='auto' needs a fixed run-name"),
    ({"dataset": "cifar10", "data-dir": ""}, "comes from the Hugging Face hub, which is "
                                             "switched off"),
    ({"task": "text", "dataset": "banking77", "model": "minilm", "data-dir": ""}, "hub"),
])
def test_bad_config_is_refused_with_one_line_naming_it(overrides, says, tmp_path):
    with pytest.raises(ConfigError) as err:
        check({**OK, **overrides}, cwd=tmp_path, hub_offline=True)
    msg = str(err.value)
    assert says in msg and "\n" not in msg, msg


def test_good_configs_pass_and_paths_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "round-1.ckpt").write_bytes(b"x")
    out = check({"dataset": "npz", "data-dir": "data", "run-dir": "runs", "resume": "old",
                 "num-server-rounds": 3}, cwd=tmp_path)
    assert out["data-dir"] == str(tmp_path / "data")
    assert out["run-dir"] == str(tmp_path / "runs")
    assert out["resume"] == str(tmp_path / "old")
    assert out["num-server-rounds"] == 3
    text = check({"task": "text", "dataset": "bbc-news", "model": "model"}, cwd=tmp_path)
    assert text["model"] == str(tmp_path / "model")  # an existing local folder, made absolute
    # a hub id (name or org/name) is left alone: the ServerApp may be online
    assert check({"task": "text", "dataset": "bbc-news", "model": "org/bert"},
                 cwd=tmp_path)["model"] == "org/bert"
    assert check({"resume": "auto", "run-name": "x", **OK}, cwd=tmp_path)["resume"] == "auto"
    # the hub is only refused where the run's processes will have it switched off
    check({"dataset": "cifar10"}, hub_offline=False)
    # the caller's directory is the default
    monkeypatch.chdir(tmp_path)
    assert check({"dataset": "npz", "data-dir": "data"})["data-dir"] == str(tmp_path / "data")


def test_every_benchmark_and_preset_config_passes():
    sys.path.insert(0, str(ROOT))
    from benchmarks.suites import SUITES

    n = 0
    for suite, make in SUITES.items():
        for name, rc in make()["runs"].items():
            vision = rc.get("task", "vision") == "vision"
            if rc.get("task") == "causal-lm" and not Path(rc["model"]).is_dir():
                continue  # built by benchmarks/causal_prep.py; tests/test_causal_lm.py checks
            rc = {**rc, "data-dir": SAMPLE} if vision and "data-dir" not in rc else rc
            if rc.get("data-dir") and not Path(rc["data-dir"]).is_dir():
                rc = {**rc, "data-dir": SAMPLE}  # shared/data is not on every machine
            check(rc)
            n += 1
    assert n > 50
    # ./run's presets (fedlora/presets.py; ./run passes --preset main unless told `vision`)
    from fedlora.presets import PRESETS

    check(PRESETS["main"])
    check({**PRESETS["vision"], "data-dir": SAMPLE})
    assert "--preset" in (ROOT / "run").read_text()


def test_tables_mirror_the_code_they_stand_for():
    from fedlora import wire
    from fedlora.methods import METHODS, flasc, get_method
    from fedlora.strategies import guard
    from fedlora.strategies.downlink import MODES
    from fedlora.tasks import text, vision

    for m in METHODS:
        s = get_method(m).Strategy
        assert validate.uploads_of(m) is s.uploads, m
    assert set(validate.VISION_MODELS) == set(vision.ARCHS) == set(text.VISION_MODELS)
    assert validate.VISION_DATASETS == text.VISION_DATASETS
    c = validate.CHOICES
    assert c["download"] == MODES and c["payload-table"] == wire.TABLES
    assert c["aggregation"] == guard.AGGREGATIONS and c["norm-bound-action"] == guard.NORM_ACTIONS
    assert c["server-opt"] == flasc.SERVER_OPTS and c["flasc-freeze"] == flasc.FREEZE_MODES
    for key in [*c, *validate.RANGES, *validate.CODEC_KEYS]:
        assert key in RunConfig.keys(), key


SHAPES = {"m.lora_A.weight": (16, 24), "m.lora_B.weight": (32, 16), "fc.bias": (32,)}
SPECS = ["fp32", "topk:0.1|affine:4", "sign", "lowrank:2", "ranks", "eden:0.5:mse"]


def test_launcher_and_strategies_refuse_the_same_combinations(task_identity):
    """Every method × upload × download × codec-up × codec-down (and a sparsifying tier codec,
    robust aggregation, DP): the check refuses exactly what the strategy refuses when it is
    built (and validates its robustness settings at start)."""
    from fedlora.methods import METHODS, get_method

    cases = [dict(method=m, upload=u, download=d, codec_up=cu, codec_down=cd)
             for m, u, d, cu, cd in itertools.product(METHODS, ("weights", "delta"),
                                                      ("full", "delta"), SPECS, SPECS)]
    cases += [dict(method=m, **extra) for m in METHODS for extra in (
        {"tier_codec_up": "fp32,topk:0.5"}, {"tier_codec_down": "topk:0.5", "download": "delta"},
        {"aggregation": "median"}, {"codec_down": "sign", "download": "delta",
                                    "codec_down_full": "sign"},
        {"dp": "local", "upload": "delta"}, {"dp": "central", "norm_bound_factor": 0.0,
                                             "upload": "delta"})]
    disagree, refused = [], 0
    for case in cases:
        cfg = RunConfig(dataset="npz", data_dir=SAMPLE, **case)
        try:
            check(cfg.as_dict())
            ours = None
        except ConfigError as err:
            ours = str(err)
        try:
            get_method(cfg.method).Strategy(cfg, SHAPES).robustness  # noqa: B018
            theirs = None
        except ValueError as err:
            theirs = str(err)
        if (ours is None) != (theirs is None):
            disagree.append((case, ours, theirs))
        refused += ours is not None
    assert not disagree, disagree[:5]
    assert len(cases) > 800 and 200 < refused < len(cases) - 200, (len(cases), refused)


def test_check_is_fast_and_never_imports_torch(tmp_path):
    """What the launcher runs before any Flower process: measured in a fresh interpreter."""
    code = ("import sys, time; t = time.perf_counter(); from fedlora.validate import check; "
            f"check({{'dataset': 'npz', 'data-dir': {SAMPLE!r}, 'codec-up': 'topk:0.1|affine:4|"
            "zstd', 'tier-codec-down': 'fp16,sign', 'download': 'delta', 'upload': 'delta', "
            "'codec-down-full': 'affine:8'}, light=True); "
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'numba' in sys.modules)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    wall = time.perf_counter() - t0
    assert out[1:] == ["False", "False"], out
    assert float(out[0]) < 2.0 and wall < 4.0, (out, wall)
