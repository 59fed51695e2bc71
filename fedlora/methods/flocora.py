"""FLoCoRA (Grativol et al., arXiv 2406.14082): LoRA trained from scratch on a frozen, seeded
random CNN; clients upload their adapter *weights* (LoRA A/B of every conv, norms, fc),
optionally affine-quantized per channel (``codec-up=affine:8``); the server averages the
dequantized tensors weighted by ``num-examples`` (plain FedAvg, no server optimizer)."""

from __future__ import annotations

from .averaging import WeightAveraging, train_weights


class FLoCoRA(WeightAveraging):
    name = "flocora"


client_train = train_weights
Strategy = FLoCoRA
