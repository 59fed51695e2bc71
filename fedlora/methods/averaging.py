"""The weight-averaging methods' shared halves (FedAvg, FLoCoRA, FL+LoRA; FFA-LoRA extends it).

Server: :class:`WeightAveraging` takes the ``num-examples``-weighted mean of the clients' weights,
or with ``upload=delta`` adds the weighted mean of their updates to the global (:func:`.base.
averaged`), one reply at a time when streamed. Client: :func:`train_weights` loads what the node
received, trains locally and uploads the trained weights (the ClientApp turns them into an update
for ``upload=delta``). A method of this family sets only its ``name`` and ``adapter``.
"""

from __future__ import annotations

from ..adapters import load_state, num_params, state_to_numpy, travelling_state
from ..strategies.base import ClientResult, ClientRound, FedLoraStrategy, averaged
from ..strategies.protocol import TrainReply, Uploads


class WeightAveraging(FedLoraStrategy):
    adapter = True
    uploads = Uploads.EITHER
    stream_weights = "examples"

    def aggregate_updates(self, server_round, state, updates):
        return averaged(self, state, updates)


def train_weights(cr: ClientRound, adapter: bool = True) -> ClientResult:
    """Load the received weights, train locally, upload the new weights."""
    model = cr.task.new_model(adapter=adapter)
    load_state(model, cr.received)
    data = cr.data()
    metrics = cr.task.train(model, data, seed=cr.seed, lr=cr.lr)
    upload = cr.upload_of(state_to_numpy(travelling_state(model)))
    return ClientResult(upload, TrainReply(len(data[1]), metrics,
                                           params_up=float(num_params(upload))))
