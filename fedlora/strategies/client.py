"""The client half every method shares: what a method's ``client_train`` gets for one train
message (:class:`ClientRound`) and what it returns (:class:`ClientResult`)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..compression import Pipeline
from ..config import RunConfig

if TYPE_CHECKING:
    from ..tasks.task import Task


@dataclass
class ClientRound:
    """Everything a method's client half needs for one train message."""

    cfg: RunConfig
    task: "Task"
    config: dict[str, Any]           # the message's train config
    received: "OrderedDict[str, np.ndarray]"  # decoded download
    partition_id: int
    num_partitions: int
    data_dir: str = ""
    state: Any = None                # Flower context.state (RecordDict), persistent per node
    codec_up: Pipeline | None = None  # the upload chain the server asked for (parsed once)

    @property
    def server_round(self) -> int:
        return int(self.config.get("server-round", 0))

    @property
    def uploads_delta(self) -> bool:
        """The server asked for the update (trained − received) instead of the weights."""
        return str(self.config.get("upload", "weights")) == "delta"

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
    upload: "OrderedDict[str, np.ndarray]"
    num_examples: int
    metrics: dict[str, float]
