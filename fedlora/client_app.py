"""ClientApp, kept thin: decode the download → the method's local rule → encode the upload."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .adapters import check_fingerprint, shapes, state_to_numpy, travelling_state
from .compression import ErrorFeedback, Pipeline, codec_key, parse_spec
from .config import RunConfig, node_tier
from .node import NodeLimits, limits, set_threads
from .privacy import privatize
from .straggler import TimedTask, slowdown
from .methods import get_method
from .strategies import secure
from .strategies.base import (ADAPTER_KEY, CONFIG_KEY, METRICS_KEY, ClientRound,
                              arrays_to_state, state_to_arrays)
from .strategies.downlink import Copy, client_apply, digest
from .strategies.protocol import PARTITION_ID, TIER, DownInstruction, TrainInstruction
from .tasks import make_task
from .wire import by_digest, decode_record, encode_record, payload_bytes

app = ClientApp()

EF_KEY = "fedlora-error-feedback"
DOWN_KEY = "fedlora-download"  # delta downloads: the copy of the global this node holds
DOWN_META_KEY = "fedlora-download-meta"  # ... and its digest


@functools.lru_cache(maxsize=4)
def _expected_shapes(task, adapter: bool) -> dict[str, tuple[int, ...]]:
    """Names and shapes of what travels for this task's model (built once per task)."""
    return shapes(state_to_numpy(travelling_state(task.new_model(adapter))))


@functools.lru_cache(maxsize=4)
def _initial_copy(task, adapter: bool) -> Copy:
    """The run's initial adapter state as this node builds it from ``model-seed`` (the base of
    a ``download-init`` delta; the server proves it is the same by its digest)."""
    state = state_to_numpy(travelling_state(task.new_model(adapter)))
    return Copy(state, digest(state))


def _error_feedback(context: Context, upload, pipe: Pipeline, digest: bool):
    """Add the stored residual, encode, keep the new residual in the node's state."""
    stored = context.state.array_records.get(EF_KEY)
    ef = ErrorFeedback.from_state_dict(arrays_to_state(stored) if stored else {})
    compensated = ef.compensate(upload)
    record = encode_record(compensated, pipe, digest)
    ef.update(compensated, decode_record(record, expected={k: np.shape(v)
                                                           for k, v in compensated.items()},
                                         key=pipe.key))  # what the server decodes
    context.state[EF_KEY] = state_to_arrays(ef.state_dict())
    return record


def _apply_download(context: Context, decoded, down: DownInstruction, init=None):
    """Full or delta download (see :mod:`fedlora.strategies.downlink`); in delta mode the node
    keeps the resulting copy and its digest in its Context state."""
    stored = context.state.array_records.get(DOWN_KEY)
    meta = context.state.config_records.get(DOWN_META_KEY)
    held = (Copy(arrays_to_state(stored), str(meta["digest"]))
            if stored is not None and meta is not None and "digest" in meta else None)
    state, keep = client_apply(decoded, down, held, init)
    if keep is not None:
        context.state[DOWN_KEY] = state_to_arrays(keep.state)
        context.state[DOWN_META_KEY] = ConfigRecord({"digest": keep.digest})
    return state


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    lim = NodeLimits.from_node_config(context.node_config)  # the node's own caps, never sent
    set_threads(cfg.client_threads, lim)
    with limits(lim):
        return _train(msg, context, cfg)


def _train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    ins = TrainInstruction.from_config(msg.content.config_records[CONFIG_KEY])  # parsed once
    method = get_method(ins.method)
    task = make_task(cfg)
    check_fingerprint(ins.base_fingerprint or "", task.fingerprint())
    adapter = method.Strategy.adapter
    rnd = ins.server_round  # codec keys (drive, eden): derived as the server does
    decoded = decode_record(msg.content.array_records[ADAPTER_KEY],
                            expected=_expected_shapes(task, adapter),
                            key=codec_key(cfg.seed, rnd, "down"))
    received = _apply_download(context, decoded, ins.down,
                               functools.partial(_initial_copy, task, adapter))
    codec_up = parse_spec(ins.codec_up)  # the chain the server asked for, parsed once
    who = ins.codec_key_id if ins.codec_key_id is not None else msg.metadata.dst_node_id
    codec_up = codec_up.keyed(codec_key(cfg.seed, rnd, "up", who))  # its partition-id, if granted
    nc = context.node_config
    # simulated heterogeneity (straggler-*): a straggler sleeps (slowdown − 1) × its training time
    # (straggler-sleep=false: no sleep, the server's simulated clock is the only time)
    factor = slowdown(cfg, int(nc["partition-id"]), int(nc["num-partitions"])) \
        if cfg.straggler_sleep else 1.0
    timed = TimedTask(task) if factor > 1.0 else None
    cr = ClientRound(
        cfg=cfg, task=timed or task, ins=ins, received=received,
        partition_id=int(nc["partition-id"]), num_partitions=int(nc["num-partitions"]),
        data_dir=str(nc.get("data-dir", "")), state=context.state, codec_up=codec_up)
    res = method.client_train(cr)
    if timed is not None:
        res.metrics["straggler-sleep-s"] = timed.slow_down(factor)
    res = privatize(res, ins, codec_up)  # dp: clip (+ local noise) before the codec
    if ins.secagg is not None:  # secure aggregation: masked k-bit integers, no codec
        return secure.client_train_reply(msg, context, res, ins.secagg)
    digest = by_digest(cfg.payload_table)
    if cfg.error_feedback:
        record = _error_feedback(context, res.upload, codec_up, digest)
    else:
        record = encode_record(res.upload, codec_up, digest)
    reply = dataclasses.replace(res.reply, payload_up=payload_bytes(record))
    return Message(RecordDict({ADAPTER_KEY: record, METRICS_KEY: reply.to_record()}),
                   reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's tier (from node config / tier-map)."""
    cfg = RunConfig.from_run_config(context.run_config)
    nc = context.node_config
    return Message(RecordDict({METRICS_KEY: MetricRecord({
        TIER: node_tier(cfg, nc), PARTITION_ID: int(nc.get("partition-id", -1))})}),
        reply_to=msg)


@app.query(secure.ACTION)
def secagg(msg: Message, context: Context) -> Message:
    """Secure aggregation's setup and unmask stages (:func:`.strategies.secure.client_query`)."""
    return secure.client_query(msg, context)
