"""The vision task: the paper's parameter counts, LoRA placement/init, the seeded base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlora.adapters import (BaseMismatchError, check_fingerprint, fingerprint, load_state,
                              state_to_numpy, travelling_state)
from fedlora.tasks.vision import VisionModelConfig, build_base, build_model


def n_params(m: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)


@pytest.mark.parametrize("arch,count", [("resnet8", 1_227_594), ("resnet18", 11_173_962)])
def test_full_model_parameter_counts(arch, count):
    assert n_params(build_base(VisionModelConfig(arch=arch))) == count


def test_flocora_mode2_trainable_count_and_placement():
    model = build_model(VisionModelConfig(arch="resnet8", lora_rank=32), adapter=True)
    assert n_params(model, trainable=True) == 258_026
    convs = [n for n, m in model.base_model.model.named_modules()
             if isinstance(m, nn.Conv2d) and ".lora_" not in n and "base_layer" in n]
    # every conv wrapped: stem, 6 block convs, 2 shortcuts
    assert len(convs) == 9
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(("lora_" in n) or ("modules_to_save" in n) for n in trainable)
    assert any(".fc.modules_to_save" in n for n in trainable)
    assert not any("base_layer" in n for n in trainable)


def test_lora_init_and_scaling():
    model = build_model(VisionModelConfig(lora_rank=8), adapter=True)
    state = travelling_state(model)
    a = [v for k, v in state.items() if "lora_A" in k]
    b = [v for k, v in state.items() if "lora_B" in k]
    assert all(float(t.abs().sum()) == 0.0 for t in b)          # B = 0
    assert all(float(t.abs().sum()) > 0.0 for t in a)           # A random (kaiming-uniform)
    layer = model.base_model.model.conv1
    assert layer.scaling["default"] == pytest.approx(16.0)     # alpha / r = 16 by default


def test_seeded_base_identical_and_seed_sensitive():
    fp1 = fingerprint(build_base(VisionModelConfig(seed=3)))
    fp2 = fingerprint(build_base(VisionModelConfig(seed=3)))
    fp3 = fingerprint(build_base(VisionModelConfig(seed=4)))
    assert fp1 == fp2 and fp1 != fp3
    m1, m2 = (build_model(VisionModelConfig(seed=3), adapter=True) for _ in range(2))
    frozen1 = {n: p for n, p in m1.named_parameters() if not p.requires_grad}
    frozen2 = dict(m2.named_parameters())
    assert frozen1 and all(torch.equal(p, frozen2[n]) for n, p in frozen1.items())


def test_wrong_fingerprint_raises_clear_error():
    with pytest.raises(BaseMismatchError, match="fingerprint mismatch"):
        check_fingerprint("0" * 16, fingerprint(build_base(VisionModelConfig())))


def test_travelling_state_round_trip_and_base_not_included():
    cfg = VisionModelConfig(feature_maps=8, lora_rank=4)
    src, dst = build_model(cfg, True), build_model(cfg, True)
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.add_(0.5)
    state = state_to_numpy(travelling_state(src))
    assert not any("base_layer" in k for k in state)
    load_state(dst, state)
    out = state_to_numpy(travelling_state(dst))
    assert all((out[k] == state[k]).all() for k in state)
    with pytest.raises(KeyError):
        load_state(dst, {k: v for k, v in list(state.items())[1:]})


def test_eval_subset_is_a_fixed_random_sample_not_the_first_rows(tmp_path):
    """With a label-sorted test file (as CIFAR-10's npz is), ``eval-max-examples`` must not keep
    only the first class; the subset is the same in every run."""
    import numpy as np

    from fedlora.config import RunConfig
    from fedlora.tasks.vision import VisionTask

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 400)):
        y = np.repeat(np.arange(10), n // 10)  # sorted by label
        np.savez(tmp_path / f"{split}.npz", x=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
                 y=y)
    cfg = RunConfig.from_run_config({"dataset": "npz", "data-dir": str(tmp_path),
                                     "eval-max-examples": 50, "device": "cpu"})
    x, y = VisionTask(cfg).test_data()
    assert len(y) == 50 and len(set(y.tolist())) >= 8
    x2, y2 = VisionTask(cfg).test_data()
    assert torch.equal(y, y2) and torch.equal(x, x2)
