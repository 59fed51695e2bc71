"""benchmarks/flowertune_bytes.py measures the right adapter: LoRA r=32 on Mistral-7B's shapes
(hidden 4096, 8 KV heads of 128, MLP 14336, 32 layers) has r x (in + out) values per module,
and one encoded message is within a small framing overhead of its payload's size."""

from __future__ import annotations

import numpy as np


def test_mistral_shapes_and_a_message_measured_on_the_wire():
    from benchmarks.flowertune_bytes import RANK, lora_shapes, message_size

    qv = lora_shapes("mistral", "peft-default")
    layer = RANK * ((4096 + 4096) + (4096 + 1024))  # q_proj 4096->4096, v_proj 4096->1024
    assert sum(int(np.prod(s)) for s in qv.values()) == 32 * layer == 13_631_488
    assert qv["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] == (1024, RANK)
    full = lora_shapes("mistral", "all")
    assert len(full) == 2 * 7 * 32  # A and B of 7 projections in 32 blocks
    small = {k: np.full(s, 1e-3, np.float32) for k, s in list(qv.items())[:4]}
    n = sum(v.size for v in small.values())
    fp32 = message_size(small, "fp32")
    assert 4 * n < fp32 < 4 * n + 4096      # the values plus Flower's and fedlora's framing
    assert message_size(small, "sign:tensor|zstd") < fp32 / 20
