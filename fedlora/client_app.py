"""ClientApp, kept thin: decode the download → the method's local rule → encode the upload."""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .adapters import check_fingerprint, shapes, state_to_numpy, travelling_state
from .compression import ErrorFeedback
from .config import RunConfig, node_tier
from .strategies import get_method
from .strategies.base import (ADAPTER_KEY, CONFIG_KEY, METRICS_KEY, ClientRound,
                              arrays_to_state, state_to_arrays)
from .tasks import make_task
from .wire import decode_record, encode_record, payload_bytes

app = ClientApp()

EF_KEY = "fedlora-error-feedback"


def _expected_shapes(task, adapter: bool) -> dict[str, tuple[int, ...]]:
    key = f"_shapes_{adapter}"
    if not hasattr(task, key):
        setattr(task, key, shapes(state_to_numpy(travelling_state(task.new_model(adapter)))))
    return getattr(task, key)


def _error_feedback(context: Context, upload, spec: str):
    """Add the stored residual, encode, keep the new residual in the node's state."""
    stored = context.state.array_records.get(EF_KEY)
    ef = ErrorFeedback.from_state_dict(arrays_to_state(stored) if stored else {})
    compensated = ef.compensate(upload)
    record = encode_record(compensated, spec)
    ef.update(compensated, decode_record(record))
    context.state[EF_KEY] = state_to_arrays(ef.state_dict())
    return record


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    torch.set_num_threads(max(1, cfg.client_threads))
    conf = dict(msg.content.config_records[CONFIG_KEY])
    method = get_method(str(conf["method"]))
    task = make_task(cfg)
    check_fingerprint(str(conf.get("base-fingerprint", "")), task.fingerprint())
    adapter = method.Strategy.adapter
    received = decode_record(msg.content.array_records[ADAPTER_KEY],
                             expected=_expected_shapes(task, adapter))
    nc = context.node_config
    cr = ClientRound(
        cfg=cfg, task=task, config=conf, received=OrderedDict(received),
        partition_id=int(nc["partition-id"]), num_partitions=int(nc["num-partitions"]),
        data_dir=str(nc.get("data-dir", "")), state=context.state)
    res = method.client_train(cr)
    spec = str(conf["codec-up"])
    if cfg.error_feedback:
        record = _error_feedback(context, res.upload, spec)
    else:
        record = encode_record(res.upload, spec)
    metrics = MetricRecord({**res.metrics, "num-examples": int(res.num_examples),
                            "payload-up": payload_bytes(record)})
    return Message(RecordDict({ADAPTER_KEY: record, METRICS_KEY: metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's tier (from node config / tier-map)."""
    cfg = RunConfig.from_run_config(context.run_config)
    nc = context.node_config
    return Message(RecordDict({METRICS_KEY: MetricRecord({
        "tier": node_tier(cfg, nc), "partition-id": int(nc.get("partition-id", -1))})}),
        reply_to=msg)
