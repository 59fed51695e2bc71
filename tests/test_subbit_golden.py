"""``drive`` / ``eden:b`` payloads and decoded values are frozen bit for bit (golden digests).

What is proved: for fixed inputs and a fixed codec key, the SHA-256 of every payload and of every
decoded tensor equals the digest recorded from the encoder of commit 9b9e6ee (before the kernels
of issue 32's speed work were rewritten). The wire format and every recorded run depend on these
bytes, so any change in the rotation's signs, the Walsh–Hadamard order of additions, the scale
sums, the sampling or the packing fails here. The cases cover every label width (1..4 and three
sub-bit fractions), both scales, ``:tensor``, chunk plans with full 16,384-value chunks, the
binary tail and a padded last chunk (including chunks of 1..8 values), a tensor of zeros, inputs
far from 1 (the 2^±100 rescaling path) and several tensors; ``sign`` and ``sign:tensor`` (whose
decoder the same work made faster) ride along.

Regenerate ONLY for an intended wire change: ``python tests/test_subbit_golden.py --write``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import OrderedDict

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedlora.compression import decode_payload, parse_spec  # noqa: E402

KEY = 0x0DDC_0FFE_E15_BAD5
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "subbit_golden.json")
SPECS = ["drive", "drive:mse", "drive:tensor", "drive:mse:tensor", "eden:2", "eden:3:mse",
         "eden:4", "eden:0.5", "eden:0.5:mse:tensor", "eden:0.25", "eden:0.25:mse", "eden:0.1",
         "sign", "sign:tensor"]


def inputs() -> dict[str, OrderedDict]:
    """Fixed inputs (numpy's PCG64 streams, seeded)."""
    rng = np.random.default_rng(20261207)

    def g(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {
        "big": OrderedDict([("w", g(70001))]),  # 4 full chunks + binary tail + padded last
        "lora": OrderedDict([("a", g(8, 1000)), ("b", g(1000, 8, scale=0.01)),
                             ("z", np.zeros((3, 5), np.float32)), ("n", g(13, scale=3.0))]),
        "tiny": OrderedDict([("t", g(5))]),          # one padded chunk of 8
        "three": OrderedDict([("t", g(3))]),         # a chunk of 4 (below the 8-point kernel)
        "one": OrderedDict([("t", g(1))]),
        "odd": OrderedDict([("t", g(16384 + 256 + 37))]),
        "huge": OrderedDict([("t", g(3000, scale=1e35))]),   # norm > 2^100: rescaled path
        "small": OrderedDict([("t", g(3000, scale=1e-33))]),  # norm < 2^-100
        "mixed": OrderedDict([("t", np.concatenate([g(2000), np.zeros(20000, np.float32),
                                                    g(3000, scale=1e-3)]))]),
        "par": OrderedDict([("t", g(40 * 16384 + 100))]),  # split over the threads
        # ``:tensor`` scaling by 2^-e that rounds to subnormals (and back by 2^e)
        "subn": OrderedDict([("a", np.array([1e3, 1e-39, 3e-40, 1.5e-45, -2.2e-38, 7e-39, 1e-41,
                                             5.0, -3e-39], np.float32)), ("b", g(40))]),
    }


def digests() -> dict[str, str]:
    out = {}
    for name, t in inputs().items():
        shapes = {k: v.shape for k, v in t.items()}
        for spec in SPECS:
            pipe = parse_spec(spec).keyed(KEY)
            payload = pipe.encode(t)
            dec = decode_payload(payload, expected=shapes, key=KEY)
            h = hashlib.sha256()
            for k in t:
                h.update(np.ascontiguousarray(dec[k], np.float32).tobytes())
            out[f"{name}/{spec}"] = (hashlib.sha256(payload).hexdigest()[:32] + "/"
                                     + h.hexdigest()[:32])
    return out


def test_payloads_and_decoded_values_equal_the_golden_digests():
    with open(GOLDEN) as f:
        want = json.load(f)
    got = digests()
    assert set(got) == set(want)
    bad = [k for k in want if got[k] != want[k]]
    assert not bad, f"{len(bad)} of {len(want)} cases changed: {bad[:8]}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(digests(), f, indent=1, sort_keys=True)
            f.write("\n")
    else:
        sys.exit(pytest.main([__file__, "-q"]))
