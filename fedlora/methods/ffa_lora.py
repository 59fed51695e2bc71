"""FFA-LoRA baseline (Sun et al. 2024): A stays frozen at its random init for the whole run;
clients train and upload only B (and non-LoRA trainables), half of FL+LoRA's upload; the server
averages B weighted by |D_k|."""

from __future__ import annotations

from collections import OrderedDict

from ..adapters import load_state, state_to_numpy, trainable_params, travelling_state
from .averaging import WeightAveraging
from ..strategies.base import ClientResult, ClientRound, averaged, weighted_mean
from ..strategies.protocol import TrainReply


def sent_keys(names) -> list[str]:
    return [k for k in names if ".lora_A." not in k]


class FFALoRA(WeightAveraging):
    name = "ffa-lora"

    def upload_shapes(self, server_round):
        return {k: self.shapes[k] for k in sent_keys(self.shapes)}

    def aggregate_updates(self, server_round, state, updates):
        return averaged(self, state, updates) if self.replies_are_deltas else \
            OrderedDict((k, v.copy()) for k, v in state.items()) | weighted_mean(updates)


def client_train(cr: ClientRound) -> ClientResult:
    model = cr.task.new_model(adapter=True)
    load_state(model, cr.received)
    for k, p in trainable_params(model).items():
        if ".lora_A." in k:
            p.requires_grad_(False)
    data = cr.data()
    metrics = cr.task.train(model, data, seed=cr.seed, lr=cr.lr)
    state = state_to_numpy(travelling_state(model))
    upload = cr.upload_of(state, sent_keys(state))
    return ClientResult(upload, TrainReply(len(data[1]), metrics,
                                           params_up=float(sum(v.size for v in upload.values()))))


Strategy = FFALoRA
