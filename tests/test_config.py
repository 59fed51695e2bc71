"""pyproject's run config, fedlora.config and docs/configuration.md agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedlora.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_match_runconfig():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert cfg == RunConfig.keys()


def test_configuration_page_documents_every_key():
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in RunConfig.keys() if f"| `{k}` |" not in page]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_coercion_and_errors():
    cfg = RunConfig.from_run_config({"lora-rank": 8, "lr": 1, "nesterov": False, "x-unknown": 1})
    assert cfg.lora_rank == 8 and cfg.lr == 1.0 and cfg.nesterov is False
    assert "x-unknown" not in cfg.as_dict()  # unknown keys are ignored
    with pytest.raises(ValueError, match="lora-rank"):
        RunConfig.from_run_config({"lora-rank": "eight"})


def test_device_auto_is_the_cpu_here_and_a_missing_gpu_is_named():
    """``device=auto`` falls back to the CPU on a machine without CUDA; asking for a GPU that is
    not there, or for an unknown device, is a clear ValueError naming the setting."""
    import torch

    from fedlora.tasks.loop import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="device='cuda'.*no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="'device' must be auto, cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="'device' must be auto, cpu, cuda"):
        resolve_device("gpu please")


def test_settings_views_read_every_field_from_the_run_config():
    """GuardSettings and DPSettings are typed views of run-config keys (config.settings_view):
    every field comes from its key, converted; a field with no key is an AttributeError."""
    import dataclasses

    import pytest

    from fedlora.config import settings_view
    from fedlora.privacy import DPSettings
    from fedlora.strategies.guard import GuardSettings

    cfg = RunConfig(max_weight_ratio=7, max_examples_per_client=123, norm_bound_action="reject",
                    dp="local", dp_mechanism="laplace", dp_clip=2, dp_adaptive_clip=False,
                    dp_count_stddev=0.5)
    g = GuardSettings.from_config(cfg, "flocora", robust_ok=True)
    assert (g.max_weight_ratio, g.max_examples, g.norm_bound_action) == (7.0, 123, "reject")
    assert isinstance(g.max_weight_ratio, float) and g.trim_fraction == cfg.trim_fraction
    d = DPSettings.from_config(cfg)
    assert (d.mode, d.mechanism, d.clip, d.adaptive, d.count_stddev) == \
        ("local", "laplace", 2.0, False, 0.5)
    assert d.delta == cfg.dp_delta and d.target_quantile == cfg.dp_target_quantile

    @dataclasses.dataclass
    class Typo:
        dp_clipp: float

    with pytest.raises(AttributeError, match="dp_clipp"):
        settings_view(Typo, cfg)


def test_launcher_overrides_take_the_shells_unquoted_strings():
    """`./run method="flocora"` reaches the launcher as method=flocora (the shell ate the
    quotes): a non-TOML value is a string; TOML values keep their types; bad items fail."""
    import pytest

    from fedlora.launch import _parse_kv

    got = _parse_kv(["method=flocora", 'codec-up="affine:4|zstd"', "lora-rank=8", "lr=5e-4",
                     "augment=false", "data-dir=/tmp/x y"])
    assert got == {"method": "flocora", "codec-up": "affine:4|zstd", "lora-rank": 8,
                   "lr": 5e-4, "augment": False, "data-dir": "/tmp/x y"}
    with pytest.raises(ValueError, match="not key=value"):
        _parse_kv(["flocora"])
    with pytest.raises(ValueError, match="given twice"):
        _parse_kv(["lora-rank=8", "lora-rank=4"])
    with pytest.raises(ValueError, match="must be float"):
        RunConfig.from_run_config(_parse_kv(["lr=abc"]))
