"""pyproject's run config, fedlora.config and the README table agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedlora.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_match_runconfig():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert cfg == RunConfig.keys()


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in RunConfig.keys() if f"`{k}`" not in readme]
    assert not missing, f"README table lacks {missing}"


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
