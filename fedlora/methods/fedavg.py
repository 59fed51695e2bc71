"""Full-model FedAvg baseline: every weight of the (same seeded) network trains and travels;
the server takes the ``num-examples``-weighted mean."""

from __future__ import annotations

from .averaging import WeightAveraging, train_weights
from ..strategies.base import ClientResult, ClientRound


class FullFedAvg(WeightAveraging):
    name = "fedavg"
    adapter = False


def client_train(cr: ClientRound) -> ClientResult:
    """FLoCoRA's local rule (load, train, send weights) on the full model."""
    return train_weights(cr, adapter=False)


Strategy = FullFedAvg
