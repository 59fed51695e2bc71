"""FLoCoRA (Grativol et al., arXiv 2406.14082): LoRA trained from scratch on a frozen, seeded
random CNN; clients upload their adapter *weights* (LoRA A/B of every conv, norms, fc),
optionally affine-quantized per channel (``codec-up=affine:8``); the server averages the
dequantized tensors weighted by ``num-examples`` (plain FedAvg, no server optimizer)."""

from __future__ import annotations

from ..adapters import load_state, num_params, state_to_numpy, travelling_state
from .base import ClientResult, ClientRound, FedLoraStrategy, averaged


class FLoCoRA(FedLoraStrategy):
    name = "flocora"
    adapter = True
    delta_upload = True
    stream_weights = "examples"

    def aggregate_updates(self, server_round, state, updates):
        return averaged(self, state, updates)


def client_train(cr: ClientRound, adapter: bool = True) -> ClientResult:
    """Load the received weights, train locally, upload the new weights."""
    model = cr.task.new_model(adapter=adapter)
    load_state(model, cr.received)
    data = cr.data()
    metrics = cr.task.train(model, data, seed=cr.seed, lr=cr.lr)
    upload = cr.upload_of(state_to_numpy(travelling_state(model)))
    metrics["params-up"] = float(num_params(upload))
    return ClientResult(upload, len(data[1]), metrics)


Strategy = FLoCoRA
