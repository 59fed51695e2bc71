"""scripts/gpu_check.py (the GPU device check) must keep working: CI has no GPU, so its
``--cpu-smoke`` mode runs every step (parity of three methods, a federation with affine:4
uploads) on the CPU on a tiny synthetic CIFAR-shaped dataset."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("test", 60)):
        np.savez(tmp_path / f"{split}.npz",
                 x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(n) % 10)
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--data-dir", str(tmp_path), "--cpu-smoke", "--rounds", "2", "--clients", "3",
                   "--per-round", "2", "--per-client", "24", "--epochs", "1",
                   "--feature-maps", "8", "--eval-examples", "40"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for method in ("flocora", "flasc", "lora-a2"):
        assert f"parity {method}" in out
    assert "round   2: acc" in out and "RESULT: ok" in out
    # two affine:4 uploads of a width-8 ResNet-8 adapter: a positive, identical size each round
    sizes = [line.split("upload ")[1].split(" MB")[0] for line in out.splitlines()
             if line.startswith("round ")]
    assert len(sizes) == 2 and sizes[0] == sizes[1] and float(sizes[0]) > 0
