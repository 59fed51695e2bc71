"""Regenerate tests/data/fashion-mnist-sample from the Debian package (see README.md here)."""
from pathlib import Path

import numpy as np

from fedlora.tasks.data import load_images

out = Path(__file__).parent / "fashion-mnist-sample"
out.mkdir(exist_ok=True)
rng = np.random.default_rng(2026)
for split, per_class in (("train", 80), ("test", 40)):
    s = load_images("fashion-mnist", "", split)
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(s.y == c), per_class, replace=False)
                                  for c in range(10)]))
    np.savez_compressed(out / f"{split}.npz", x=s.x[idx, ..., 0], y=s.y[idx])
