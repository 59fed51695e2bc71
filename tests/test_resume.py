"""Crash and resume: a run stopped after round k of N and resumed from its checkpoint ends with the
same final adapter, bit for bit, and the same round records (timing fields aside) as the run that
was never interrupted; a changed config is refused; a torn or corrupt checkpoint is detected and
the previous one used.

Most tests drive the real ServerApp ``run`` in this process through :class:`InProcessGrid`, which
hands every message to the real ClientApp functions (one Flower Context per node, kept across
messages as a SuperNode keeps it) and can "crash" (raise, as a Grid does when the SuperLink dies)
when the server sends the train messages of a given round. One slow test kills a real Flower
simulation (every process of it) after round 1 and finishes the run with ``resume``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora import checkpoint
from fedlora.checkpoint import (CheckpointError, Checkpointer, ResumeRefused, latest,
                                list_checkpoints, read_checkpoint)
from fedlora.config import RunConfig
from fedlora.results import read_rounds
from fedlora.server_app import run

from conftest import Crash, InProcessGrid

TINY = {
    "num-server-rounds": 3, "feature-maps": 8, "lora-rank": 4, "local-epochs": 1,
    "max-examples-per-client": 48, "batch-size": 16, "eval-max-examples": 64,
    "fraction-train": 0.67, "min-train-nodes": 2, "min-available-nodes": 3,
    "dataset": "npz", "partitioner": "iid", "client-threads": 1, "device": "cpu",
}
TIMING = {"round_s", "wall_s", "eval_s", "checkpoint_bytes"}


def config(tmp: Path, sample_dir: str, name: str, **extra) -> dict:
    return {**TINY, "data-dir": sample_dir, "run-dir": str(tmp), "run-name": name, **extra}


def start(rc: dict, **grid_kw):
    grid = InProcessGrid(rc, **grid_kw)
    return run(grid, RunConfig.from_run_config(rc)), grid


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["travelling"]


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"{k} differs"


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def assert_same_nested(a, b, path="") -> None:
    """Equal containers of tensors / arrays / values, bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b) and a.dtype == b.dtype, path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same_nested(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_nested(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# (method, run-config extras, k = the last round completed before the crash)
CASES = {
    "flocora": ({"codec-up": "affine:8"}, 1),
    # the server AdamW moments, the density schedule and the fixed mask (made at round 2) must
    # all come back from round 2's checkpoint
    "flasc": ({"density-down": 0.25, "density-up": 0.25, "flasc-freeze": "server",
               "server-lr": 0.01, "density-decay": 0.5, "density-decay-rounds": 1}, 2),
    # resumed at an even round: the A half of LoRA-A2's alternation, a cosine lr schedule, and
    # Flower's own node sampling (Python's global `random`, whose state is in the checkpoint)
    "lora-a2": ({"rank-budget": 2, "lr-schedule": "cosine", "client-sampling": "flower"}, 1),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_dir):
    """The uninterrupted run of each case (computed on first use)."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(method: str) -> tuple[Path, dict]:
        if method not in cache:
            tmp = tmp_path_factory.mktemp(f"ref-{method}")
            extra, _ = CASES[method]
            rc = config(tmp, sample_dir, "ref", method=method, **extra)
            start(rc)
            cache[method] = (tmp / "ref", rc)
        return cache[method]

    return get


def crashed(tmp: Path, rc: dict, k: int, **grid_kw) -> tuple[Path, InProcessGrid]:
    """Run ``rc`` until the server sends round k+1's train messages, then crash."""
    grid = InProcessGrid(rc, crash_at=k + 1, **grid_kw)
    with pytest.raises(Crash):
        run(grid, RunConfig.from_run_config(rc))
    run_dir = Path(rc["run-dir"]) / rc["run-name"]
    assert [r for r, _ in list_checkpoints(run_dir)][-1] == k
    assert not (run_dir / "summary.json").exists()
    return run_dir, grid


@pytest.mark.parametrize("method", list(CASES))
def test_resumed_run_equals_uninterrupted_run(method, reference, tmp_path, sample_dir,
                                              task_identity):
    """Stopped after round k (the SuperLink died while round k+1 was being sent), restarted with
    ``resume=<run dir>``: the final adapter is bit for bit the uninterrupted run's, so is the
    method's server state (FLASC's optimizer moments and mask), and rounds.jsonl holds every
    round exactly once with the same records (timing fields aside)."""
    ref_dir, ref_rc = reference(method)
    extra, k = CASES[method]
    rc = config(tmp_path, sample_dir, "crash", method=method, **extra)
    run_dir, grid = crashed(tmp_path, rc, k)
    assert [r["round"] for r in read_rounds(run_dir)] == list(range(k + 1))

    summary, grid2 = start({**rc, "resume": str(run_dir)}, contexts=grid.contexts)
    assert min(grid2.train_rounds) == k + 1        # nothing before the checkpoint ran again
    assert summary["rounds"] == 3

    assert_same_state(final_state(ref_dir), final_state(run_dir))
    got, want = read_rounds(run_dir), read_rounds(ref_dir)
    assert [r["round"] for r in got] == [0, 1, 2, 3]
    assert comparable(got) == comparable(want)
    csv_rows = (run_dir / "rounds.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in csv_rows[1:]] == ["0", "1", "2", "3"]
    # the method's whole server state after the last round is the same too
    a, b = latest(ref_dir).state(), latest(run_dir).state()
    assert_same_nested(a["strategy"], b["strategy"])
    assert_same_nested(a["global"], b["global"])
    # each round's checkpoint size is in its record, and it is the file's size
    last = latest(run_dir)
    assert got[-1]["checkpoint_bytes"] == last.path.stat().st_size > 0
    # TensorBoard has every round once
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={SCALARS: 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 1, 2, 3]


def test_resume_refuses_a_changed_method_seed_or_fewer_rounds(tmp_path, sample_dir,
                                                              task_identity):
    rc = config(tmp_path, sample_dir, "crash", method="flocora")
    run_dir, _ = crashed(tmp_path, rc, 1)
    for change, key in (({"method": "fl-lora"}, "'method'"), ({"seed": 7}, "'seed'"),
                        ({"codec-up": "affine:4"}, "'codec-up'"),
                        ({"num-server-rounds": 2}, "'num-server-rounds' 2 is below")):
        with pytest.raises(ResumeRefused, match=key):
            start({**rc, **change, "resume": str(run_dir)})
    # the refused attempts changed nothing: the run still resumes from round 1
    assert [r["round"] for r in read_rounds(run_dir)] == [0, 1]
    # what benchmarks/run.py decides with, and what `fedlora.launch --resume` passes to flwr
    assert checkpoint.resumable(run_dir, rc) == (True, "round 1")
    ok, why = checkpoint.resumable(run_dir, {**rc, "seed": 7})
    assert not ok and "'seed'" in why
    assert checkpoint.resumable(tmp_path / "nowhere", rc) == (False, "no valid checkpoint")
    again = checkpoint.resume_run_config(run_dir, {"round-timeout": 60.0})
    assert again["feature-maps"] == 8 and again["round-timeout"] == 60.0
    assert again["resume"] == str(run_dir) and "seed" not in again   # defaults are not repeated
    checkpoint.check_compatible(latest(run_dir).header, RunConfig.from_run_config(again))
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        start({**rc, "resume": str(tmp_path / "nowhere")})


def test_a_torn_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, sample_dir,
                                                          task_identity):
    """The newest checkpoint cut short (the host died while writing it, without the atomic
    rename) and a stale temp file: the previous checkpoint is used, and the resumed run still
    ends exactly as the uninterrupted one."""
    ref_dir, _ = reference("flocora")
    rc = config(tmp_path, sample_dir, "crash", method="flocora", **CASES["flocora"][0])
    run_dir, grid = crashed(tmp_path, rc, 2)
    newest = checkpoint.checkpoint_path(run_dir, 2)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) * 2 // 3])
    (newest.parent / ".round-000003.ckpt.tmp-1").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(newest)
    assert latest(run_dir).round == 1

    start({**rc, "resume": str(run_dir)}, contexts=grid.contexts)
    assert_same_state(final_state(ref_dir), final_state(run_dir))
    assert comparable(read_rounds(run_dir)) == comparable(read_rounds(ref_dir))
    assert (newest.parent / "round-000002.ckpt.corrupt").exists()  # set aside, not reused
    assert [r for r, _ in list_checkpoints(run_dir)] == [2, 3]      # keep-checkpoints = 2


def test_corruption_anywhere_is_detected(tmp_path):
    ck = Checkpointer(tmp_path, keep=3)
    state = {"global": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "x": [1, (2, None)]}
    for rnd in (1, 2):
        records = [{"round": 0}, {"round": rnd, "accuracy": 0.5}]
        size = ck.save(rnd, {"method": "flocora", "config": {}}, state, records)
        assert records[-1]["checkpoint_bytes"] == size == checkpoint.checkpoint_path(
            tmp_path, rnd).stat().st_size
    path = checkpoint.checkpoint_path(tmp_path, 2)
    good = path.read_bytes()
    loaded = read_checkpoint(path)
    assert loaded.round == 2 and loaded.records[-1]["checkpoint_bytes"] == len(good)
    np.testing.assert_array_equal(loaded.state()["global"]["w"], state["global"]["w"])
    for pos in (5, 30, 100, len(good) // 2, len(good) - 3):   # magic, digest, header, state, records
        bad = bytearray(good)
        bad[pos] ^= 0x20
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError):
            read_checkpoint(path)
        assert latest(tmp_path).round == 1
    path.write_bytes(good + b"x")
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    path.write_bytes(b"")
    assert latest(tmp_path).round == 1


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.ckpt"
    checkpoint.write_atomic(target, b"old")

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", fail)
    with pytest.raises(OSError):
        checkpoint.write_atomic(target, b"new content")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.ckpt"]  # no temp file left


def test_rng_state_round_trips(tmp_path):
    import random

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    saved = checkpoint.rng_state()
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    ck = Checkpointer(tmp_path, keep=1)
    ck.save(1, {"config": {}}, {"rng": saved}, [{"round": 1}])
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    checkpoint.set_rng_state(latest(tmp_path).state()["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_download_delta_resume_same_nodes_and_new_nodes(tmp_path, sample_dir, task_identity):
    """``download=delta``: the server's per-node copies are in the checkpoint. A ServerApp restart
    with the nodes still up (same ids, same Context state: deployment) continues with delta
    downloads and ends exactly as the uninterrupted run. A restart where the nodes come back
    with new ids and no state (simulation) still finishes: every node is served in full."""
    extra = {"method": "flocora", "download": "delta", "codec-down": "affine:8"}
    ref_rc = config(tmp_path, sample_dir, "ref", **extra)
    start(ref_rc)
    rc = config(tmp_path, sample_dir, "same-nodes", **extra)
    run_dir, grid = crashed(tmp_path, rc, 1)
    start({**rc, "resume": str(run_dir)}, contexts=grid.contexts)
    assert_same_state(final_state(tmp_path / "ref"), final_state(run_dir))
    got = read_rounds(run_dir)
    assert comparable(got) == comparable(read_rounds(tmp_path / "ref"))
    assert got[2]["full_downloads"] < got[2]["clients"]     # deltas went on after the restart

    rc = config(tmp_path, sample_dir, "new-nodes", **extra)
    run_dir, _ = crashed(tmp_path, rc, 1)
    summary, _ = start({**rc, "resume": str(run_dir)}, node_ids=(201, 202, 203))
    got = read_rounds(run_dir)
    assert summary["rounds"] == 3 and [r["round"] for r in got] == [0, 1, 2, 3]
    assert got[2]["full_downloads"] == got[2]["clients"] == 2 and got[2]["failures"] == 0
    assert got[2]["control_bytes"] > 0                       # the new ids were asked again


def test_resume_auto_and_more_rounds(tmp_path, sample_dir, task_identity):
    """``resume=auto`` starts fresh when this run-name has no checkpoint and continues when it
    has; a finished run resumed with a larger ``num-server-rounds`` runs only the new rounds."""
    rc = config(tmp_path, sample_dir, "auto", method="flocora", resume="auto",
                **{"num-server-rounds": 2})
    start(rc)
    run_dir = tmp_path / "auto"
    assert [r["round"] for r in read_rounds(run_dir)] == [0, 1, 2]
    _, grid = start({**rc, "num-server-rounds": 3})
    assert grid.train_rounds == [3, 3]
    assert [r["round"] for r in read_rounds(run_dir)] == [0, 1, 2, 3]


def test_hetlora_and_flasc_state_round_trip(tmp_path, task_identity):
    """state_dict → a fresh strategy's load_state_dict → the same state; HetLoRA's pruned ranks
    follow partitions to new node ids after a simulation restart."""
    from conftest import FakeGrid

    from fedlora.methods import get_method
    from fedlora.strategies.base import RoundStats

    shapes = {"a.lora_A.weight": (4, 3), "a.lora_B.weight": (5, 4), "fc.bias": (5,)}
    cfg = RunConfig(method="hetlora", rank_budget=4, min_train_nodes=1, min_available_nodes=1)
    het = get_method("hetlora").Strategy(cfg, shapes)
    het.learn_tiers(FakeGrid([11, 12]), [11, 12], RoundStats(1))
    het.pruned = {11: 2}
    het.svd_failures = 3
    fresh = get_method("hetlora").Strategy(cfg, shapes)
    fresh.load_state_dict(het.state_dict())
    assert fresh.pruned == {11: 2} and fresh.svd_failures == 3 and fresh.partitions == {11: 0, 12: 1}
    assert fresh.client_rank(11) == 2
    fresh.learn_tiers(FakeGrid([21, 22]), [21, 22], RoundStats(2))   # new ids, same partitions
    assert fresh.client_rank(21) == 2 and fresh.client_rank(22) == 4

    cfg = RunConfig(method="flasc", min_train_nodes=1, min_available_nodes=1)
    flasc = get_method("flasc").Strategy(cfg, shapes)
    with pytest.raises(ValueError, match="method"):
        flasc.load_state_dict(het.state_dict())
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    flasc._optimizer(state)
    for p in flasc._params.values():
        p.grad = torch.ones_like(p)
    flasc._opt.step()
    flasc._fixed_mask = {k: v > 0 for k, v in state.items()}
    fresh = get_method("flasc").Strategy(cfg, shapes)
    ck = Checkpointer(tmp_path, 1)
    ck.save(1, {"config": {}}, {"s": flasc.state_dict()}, [{"round": 1}])
    fresh.load_state_dict(latest(ck.run_dir).state()["s"])
    assert_same_nested(flasc.state_dict()["flasc"], fresh.state_dict()["flasc"])


# ------------------------------------------------------------------------- real simulation


@pytest.mark.slow
def test_simulation_killed_after_round_1_resumes(tmp_path, sample_dir, task_identity):
    """A real simulation (SuperLink, SuperExec, ServerApp, Ray workers) SIGKILLed as soon as
    round 1's checkpoint is on disk; ``resume`` on a fresh SuperLink (new node ids, no client
    state) finishes it. Final adapter: bit for bit the uninterrupted run's (here the in-process
    run of the same config: same code, same seeds); the records agree except for what depends
    on node ids (the partition query is sent again to the new nodes)."""
    from fedlora.launch import pids_with_env, run_simulation

    rc = {**TINY, "method": "lora-a2", "rank-budget": 2, "data-dir": sample_dir,
          "fraction-train": 1.0, "min-train-nodes": 2, "min-available-nodes": 2,
          "run-dir": str(tmp_path / "runs"), "run-name": "killed"}
    run_dir = tmp_path / "runs" / "killed"
    killed: list[int] = []
    stop = threading.Event()

    def kill_all() -> int:
        n = 0
        for pid in pids_with_env(str(tmp_path / "work1")):  # this test's processes
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                n += 1
            except ProcessLookupError:
                pass
        return n

    def killer() -> None:
        while not stop.is_set():
            if checkpoint.checkpoint_path(run_dir, 1).exists():
                # a process may be starting while we kill (a Ray worker): kill until none is left
                quiet_since = time.monotonic()
                while time.monotonic() - quiet_since < 2.0:
                    if kill_all():
                        quiet_since = time.monotonic()
                    time.sleep(0.1)
                return
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        res, _ = run_simulation(rc, nodes=2, work_dir=tmp_path / "work1", timeout=300)
    finally:
        stop.set()
        t.join()
    assert killed and res.returncode != 0
    assert not (run_dir / "summary.json").exists()
    assert latest(run_dir).round >= 1
    done = latest(run_dir).round

    deadline = time.monotonic() + 15  # SIGKILLed processes take a moment to disappear
    while pids_with_env(str(tmp_path / "work1")) and time.monotonic() < deadline:
        kill_all()
        time.sleep(0.2)
    assert not pids_with_env(str(tmp_path / "work1"))
    # a fresh SuperLink (and database): new node ids, no client state
    res, _ = run_simulation(checkpoint.resume_run_config(run_dir, {}), nodes=2,
                            work_dir=tmp_path / "work2", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    assert not pids_with_env(str(tmp_path / "work2"))
    got = read_rounds(run_dir)
    assert [r["round"] for r in got] == [0, 1, 2, 3]
    assert "resuming" in res.stdout and f"after round {done}" in res.stdout
    assert got[done + 1]["control_bytes"] > 0   # new node ids: partitions asked again

    ref_rc = {**rc, "run-dir": str(tmp_path / "ref")}
    start(ref_rc, node_ids=(101, 102))
    assert_same_state(final_state(tmp_path / "ref" / "killed"), final_state(run_dir))
    # message sizes include Flower's metadata (ids), and the in-process server evaluates with
    # the thread count the in-process clients set: loss may differ in its last float32 bits
    keys = ("round", "accuracy", "clients", "partitions", "train_metrics")
    want = read_rounds(tmp_path / "ref" / "killed")
    assert [{k: r.get(k) for k in keys} for r in got] == [{k: r.get(k) for k in keys}
                                                         for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6)
