"""The client half every method shares: what a method's ``client_train`` gets for one train
message (:class:`ClientRound`: the parsed :class:`.protocol.TrainInstruction` and the parsed
upload chain) and what it returns (:class:`ClientResult`: the upload and its
:class:`.protocol.TrainReply`)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..compression import Pipeline, parse_spec
from ..config import RunConfig
from .protocol import TrainInstruction, TrainReply

if TYPE_CHECKING:
    from ..tasks.task import Task


@dataclass
class ClientRound:
    """Everything a method's client half needs for one train message."""

    cfg: RunConfig
    task: "Task"
    ins: TrainInstruction            # the message's train instruction (parsed once)
    received: "OrderedDict[str, np.ndarray]"  # decoded download
    partition_id: int
    num_partitions: int
    data_dir: str = ""
    state: Any = None                # Flower context.state (RecordDict), persistent per node
    codec_up: Pipeline | None = None  # the upload chain the server asked for (parsed once:
    #                                   the ClientApp's, keyed; else ``ins.codec_up`` parsed here)

    def __post_init__(self) -> None:
        if self.codec_up is None:
            self.codec_up = parse_spec(self.ins.codec_up)

    @property
    def server_round(self) -> int:
        return self.ins.server_round

    @property
    def uploads_delta(self) -> bool:
        """The server asked for the update (trained − received) instead of the weights."""
        return self.ins.uploads_delta

    def upload_of(self, trained: Mapping[str, np.ndarray], keys=None
                  ) -> "OrderedDict[str, np.ndarray]":
        """What a weight-averaging method sends: its trained tensors (``keys``, default all),
        or their difference from what it received when the server asked for deltas."""
        keys = list(trained) if keys is None else keys
        if self.uploads_delta:
            return OrderedDict((k, (trained[k] - self.received[k]).astype(np.float32))
                               for k in keys)
        return OrderedDict((k, trained[k]) for k in keys)

    @property
    def lr(self) -> float:
        """This round's local learning rate (``lr-schedule``)."""
        return self.cfg.lr_at(self.server_round)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed * 1_000_003 + self.server_round * 1009 + self.partition_id)

    def data(self):
        return self.task.client_data(self.partition_id, self.num_partitions, self.data_dir)


@dataclass
class ClientResult:
    """A method's answer: the tensors to upload and what the reply reports of them."""

    upload: "OrderedDict[str, np.ndarray]"
    reply: TrainReply

    @property
    def num_examples(self) -> int:
        return self.reply.num_examples

    @property
    def metrics(self) -> dict[str, float]:
        """The task's training metrics (the protocol's own are fields of ``reply``)."""
        return self.reply.metrics
