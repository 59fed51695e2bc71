"""ServerApp: read the run config → build task, strategy, recorder → ``strategy.start``."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from . import checkpoint, provenance, validate
from .adapters import (flocora_analytic_bits, load_state, num_params, shapes, state_to_numpy,
                       travelling_state)
from .compression import Pipeline
from .compression.payload import DIGEST_VERSION, FORMAT_VERSION
from .config import RunConfig
from .results import Recorder
from .methods import get_method
from .strategies.base import ADAPTER_KEY, arrays_to_state, state_to_arrays
from .strategies.protocol import base_config
from .wire import STYPE, by_digest, encode_record, message_bytes
from .tasks import make_task

app = ServerApp()
log = logging.getLogger("flwr.fedlora")


def affine_bits(pipe: Pipeline) -> int:
    """Bit width of the ``affine:b`` value coder of a codec chain, else 32."""
    coder = pipe.value_coder
    return int(coder.bits) if coder.codec_id == "affine" else 32


def eval_due(cfg: RunConfig, server_round: int) -> bool:
    """Central evaluation runs before round 1, every ``eval-every`` rounds and after the last."""
    every = max(int(cfg.eval_every), 1)
    return server_round % every == 0 or server_round >= cfg.num_server_rounds


def resolve_run_dir(cfg: RunConfig) -> Path:
    """``run-dir``/``run-name`` (default name: timestamp + method). The name must be one plain
    folder name: a path (``../x``, ``/tmp/x``, ``a/b``) cannot put a run outside ``run-dir``."""
    name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}"
    base = Path(cfg.run_dir).expanduser().resolve()
    validate.check_run_name(name)  # the launcher's check (a ConfigError is a ValueError)
    if (base / name).resolve().parent != base:
        raise ValueError(f"run-config 'run-name' must be one folder name inside run-dir, got "
                         f"{name!r}")
    return base / name


def run(grid: Grid, cfg: RunConfig) -> dict:
    # The server only evaluates while clients are idle: give it every core.
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    random.seed(cfg.seed)  # Flower's node sampling uses `random`
    np.random.seed(cfg.seed)
    task = make_task(cfg)
    method = get_method(cfg.method)
    model = task.new_model(adapter=method.Strategy.adapter)
    init = state_to_numpy(travelling_state(model))
    strategy = method.Strategy(cfg, shapes(init))
    if cfg.download_init and cfg.download == "delta":
        strategy.downlink.set_init(init)
    full_params = num_params(state_to_numpy(task.base().state_dict()))
    fp = task.fingerprint()
    meta = {
        "config": cfg.as_dict(), "method": cfg.method, "base_fingerprint": fp, "wire": STYPE,
        "params_travelling": num_params(init), "params_full_model": full_params,
        "analytic_bytes_per_message_fp32": flocora_analytic_bits(init, 32) / 8,
        "analytic_bytes_per_message_up": flocora_analytic_bits(init, affine_bits(strategy.codec_up)) / 8,
        "fedavg_bytes_per_message": 4 * full_params,
        "fedavg_message_bytes": fedavg_message_bytes(task, by_digest(cfg.payload_table)),
        # code version, package versions, the server's device and threads, wire and payload
        # versions (fedlora/provenance.py)
        "provenance": provenance.record(
            STYPE, DIGEST_VERSION if by_digest(cfg.payload_table) else FORMAT_VERSION,
            str(task.device), torch.get_num_threads()),
    }
    # the commit the code came from, at the top level (None when neither the launcher nor a
    # checkout says: the source hash in provenance.code still pins it)
    code = meta["provenance"]["code"]
    meta["commit"], meta["commit_dirty"] = code.get("git_commit"), code.get("git_dirty")
    # resume (run-config `resume`): the run folder and the checkpoint to continue from
    run_dir, resumed = checkpoint.find_resume(cfg, resolve_run_dir(cfg))
    ckpt = checkpoint.Checkpointer(run_dir, cfg.keep_checkpoints)
    ckpt_header = checkpoint.header_for(cfg, fp, shapes(init))
    first_round, current = 1, init
    if resumed is not None:
        checkpoint.check_compatible(resumed.header, cfg, fp, shapes(init))
        current = checkpoint.restore(strategy, resumed.state())
        first_round = resumed.round + 1
        ckpt.set_aside_after(resumed.round)
        meta["resumed_from"] = {"round": resumed.round, "checkpoint": str(resumed.path)}
        log.info("[fedlora] resuming %s after round %d (%s)", run_dir, resumed.round,
                 resumed.path.name)
    else:
        if (run_dir / "rounds.jsonl").exists() and (run_dir / "rounds.jsonl").stat().st_size:
            raise ValueError(f"run folder {run_dir} already holds a run: choose another "
                             "run-name, remove the folder, or continue it with resume=auto")
        ckpt.clear()
    recorder = Recorder(run_dir, meta, resume_records=resumed.records if resumed else None)
    test = task.test_data()

    def evaluate_fn(server_round: int, arrays) -> MetricRecord | None:
        if not eval_due(cfg, server_round):
            return None
        t = time.time()
        load_state(model, strategy.eval_state(server_round, arrays_to_state(arrays)))
        metrics = task.evaluate(model, test)
        if hasattr(task, "after_evaluation"):  # causal-lm: generations.jsonl
            task.after_evaluation(model, server_round, run_dir)
        metrics["eval_s"] = round(time.time() - t, 3)
        return MetricRecord(metrics)

    def save(server_round: int, arrays, records: list[dict]):
        state = checkpoint.server_state(strategy, arrays_to_state(arrays))
        return ckpt.save(server_round, ckpt_header, state, records)

    # the strategy writes each round's record after evaluate_fn (FedLoraStrategy.end_round)
    strategy.keep_records(recorder, meta["analytic_bytes_per_message_up"],
                          save if ckpt.enabled else None)

    # one loop for fresh and resumed runs (FedLoraStrategy.start): a resumed run goes on from
    # the round after its checkpoint with the real round numbers
    if cfg.aggregation_mode == "async":  # FedBuff: the second loop (docs/async.md)
        from .strategies.buffered import run_async

        result, failed = run_async(strategy, grid, state_to_arrays(current),
                                   cfg.num_server_rounds, cfg.round_timeout, base_config(fp),
                                   evaluate_fn, first_round)
    else:
        failed = ""
        result = strategy.start(
            grid=grid, initial_arrays=state_to_arrays(current),
            num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
            train_config=base_config(fp), evaluate_fn=evaluate_fn, first_round=first_round)
    final = arrays_to_state(result.arrays)
    load_state(model, final)
    if method.Strategy.adapter:
        model.save_pretrained(str(run_dir / "adapter"))
    elif cfg.task == "causal-lm":  # full fine-tuning: a model folder an external harness loads
        model.save_pretrained(str(run_dir / "model"))
        task.tokenizer.save_pretrained(str(run_dir / "model"))
    torch.save({"state_dict": model.state_dict(), "travelling": final, "meta": meta},
               run_dir / "checkpoint.pt")
    summary = recorder.finish({"run_dir": str(run_dir), "method": cfg.method,
                               "codec_up": cfg.codec_up, "codec_down": cfg.codec_down,
                               **strategy.privacy.summary(),
                               **fedavg_comparison(recorder.records, meta["fedavg_message_bytes"])})
    log.info("[fedlora] done: final accuracy %.4f | %.3f MB on the wire (down %.3f, up %.3f, "
             "control %.3f) | FedAvg, full model in fp32, same rounds and clients: %.3f MB = "
             "%.1fx more", summary["final_accuracy"] or float("nan"),
             summary["total_mb"], summary["total_mb_down"], summary["total_mb_up"],
             summary["total_mb_control"], summary["fedavg_equivalent_mb"],
             summary["ratio_vs_fedavg"] or float("nan"))  # None: nothing moved
    if failed:  # records, adapter and summary are written: the run still did not complete
        raise RuntimeError(f"{failed} (records in {run_dir})")
    return summary


def fedavg_message_bytes(task, digest: bool = False) -> int:
    """Measured size of one FedAvg message: the full model (frozen base included) in fp32,
    encoded and framed exactly as fedlora's messages are (``digest``: payload format 2, as the
    run's own messages)."""
    full = state_to_numpy(task.base().state_dict())
    msg = Message(RecordDict({ADAPTER_KEY: encode_record(full, "fp32", digest)}),
                  message_type=MessageType.TRAIN, dst_node_id=1)
    return message_bytes(msg)


def fedavg_comparison(records: list[dict], fedavg_msg: int) -> dict:
    """What FedAvg would have moved for the same rounds and clients (one full-model message
    each way per client, the same control messages), and the ratio to what this run moved."""
    msgs = sum(r.get("messages_down", len(r.get("bytes_down_per_node", {})))  # async: counted
               + r.get("messages_up", len(r.get("bytes_up_per_node", {}))) for r in records)
    ours = sum(int(r.get(k, 0)) for r in records for k in ("bytes_down", "bytes_up",
                                                           "control_bytes"))
    control = sum(int(r.get("control_bytes", 0)) for r in records)
    fedavg = msgs * fedavg_msg + control
    return {"total_mb": ours / 1e6, "fedavg_equivalent_mb": fedavg / 1e6,
            "ratio_vs_fedavg": fedavg / ours if ours else None}


@app.main()
def main(grid: Grid, context: Context) -> None:
    # the launcher's checks (fedlora/validate.py) again: a config may come by `flwr run .`
    known = RunConfig.keys()
    checked = validate.check({k: v for k, v in context.run_config.items() if k in known})
    cfg = RunConfig.from_run_config(checked)
    summary = run(grid, cfg)
    print(json.dumps(summary, default=str))
