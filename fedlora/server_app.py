"""ServerApp: read the run config → build task, strategy, recorder → ``strategy.start``."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from .adapters import (flocora_analytic_bits, load_state, num_params, shapes, state_to_numpy,
                       travelling_state)
from .compression import parse_spec
from .config import RunConfig
from .results import Recorder
from .strategies import get_method
from .strategies.base import arrays_to_state, state_to_arrays
from .tasks import make_task

app = ServerApp()


def affine_bits(spec: str) -> int:
    """Bit width of the ``affine:b`` value coder of a codec spec, else 32."""
    coder = parse_spec(spec).value_coder
    return int(coder.bits) if coder.codec_id == "affine" else 32


def resolve_run_dir(cfg: RunConfig) -> Path:
    name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}"
    return Path(cfg.run_dir).expanduser().resolve() / name


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
    full_params = num_params(state_to_numpy(task.base().state_dict()))
    fp = task.fingerprint()
    meta = {
        "config": cfg.as_dict(), "method": cfg.method, "base_fingerprint": fp,
        "params_travelling": num_params(init), "params_full_model": full_params,
        "analytic_bytes_per_message_fp32": flocora_analytic_bits(init, 32) / 8,
        "analytic_bytes_per_message_up": flocora_analytic_bits(init, affine_bits(cfg.codec_up)) / 8,
        "fedavg_bytes_per_message": 4 * full_params,
    }
    run_dir = resolve_run_dir(cfg)
    recorder = Recorder(run_dir, meta)
    test = task.test_data()

    def evaluate_fn(server_round: int, arrays) -> MetricRecord:
        load_state(model, strategy.eval_state(server_round, arrays_to_state(arrays)))
        metrics = task.evaluate(model, test)
        rec = strategy.round_record(server_round)
        rec["analytic_bytes_up"] = meta["analytic_bytes_per_message_up"] * rec["clients"]
        recorder.log_round({**rec, **metrics})
        return MetricRecord(metrics)

    result = strategy.start(
        grid=grid, initial_arrays=state_to_arrays(init), num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout, train_config=ConfigRecord({"base-fingerprint": fp}),
        evaluate_fn=evaluate_fn)
    final = arrays_to_state(result.arrays) if len(result.arrays.keys()) else init
    load_state(model, final)
    if method.Strategy.adapter:
        model.save_pretrained(str(run_dir / "adapter"))
    torch.save({"state_dict": model.state_dict(), "travelling": final, "meta": meta},
               run_dir / "checkpoint.pt")
    summary = recorder.finish({"run_dir": str(run_dir), "method": cfg.method,
                               "codec_up": cfg.codec_up, "codec_down": cfg.codec_down})
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    summary = run(grid, cfg)
    print(json.dumps(summary, default=str))
