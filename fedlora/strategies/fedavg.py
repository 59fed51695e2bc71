"""Full-model FedAvg baseline: every weight of the (same seeded) network trains and travels;
the server takes the ``num-examples``-weighted mean."""

from __future__ import annotations

from . import flocora
from .base import ClientResult, ClientRound, FedLoraStrategy, averaged


class FullFedAvg(FedLoraStrategy):
    name = "fedavg"
    adapter = False
    delta_upload = True
    stream_weights = "examples"

    def aggregate_updates(self, server_round, state, updates):
        return averaged(self, state, updates)


def client_train(cr: ClientRound) -> ClientResult:
    """Same local rule as FLoCoRA's (load, train, send weights) on the full model."""
    return flocora.client_train(cr, adapter=False)


Strategy = FullFedAvg
