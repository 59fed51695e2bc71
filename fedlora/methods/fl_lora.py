"""FL + LoRA baseline: clients train A and B, upload both; the server averages A and B
separately, weighted by |D_k| (the product of averages is not the average of products: the
"discordance" LoRA-A2 avoids)."""

from __future__ import annotations

from .averaging import WeightAveraging, train_weights


class FLLoRA(WeightAveraging):
    name = "fl-lora"


client_train = train_weights
Strategy = FLLoRA
