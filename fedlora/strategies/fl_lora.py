"""FL + LoRA baseline: clients train A and B, upload both; the server averages A and B
separately, weighted by |D_k| (the product of averages is not the average of products: the
"discordance" LoRA-A2 avoids)."""

from __future__ import annotations

from . import flocora
from .base import FedLoraStrategy, averaged


class FLLoRA(FedLoraStrategy):
    name = "fl-lora"
    adapter = True
    delta_upload = True
    stream_weights = "examples"

    def aggregate_updates(self, server_round, state, updates):
        return averaged(self, state, updates)


client_train = flocora.client_train
Strategy = FLLoRA
