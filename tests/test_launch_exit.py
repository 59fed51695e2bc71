"""Exit status of ``python -m fedlora.launch`` (and so of ``./run``): 2 and one line when the config
or the arguments are refused, before any file, folder or Flower process exists; 1 and one line
naming the ServerApp's error when the run fails (judged from Flower's run status and the run's
summary.json, not from ``flwr run``'s exit code, which is 0 then); 0 and ``records:`` only when
the records exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora import launch
from fedlora.launch import judge

ROOT = Path(__file__).resolve().parent.parent
TINY = ["num-server-rounds=1", "feature-maps=8", "lora-rank=4", "max-examples-per-client=32",
        "eval-max-examples=32", 'dataset="npz"', 'partitioner="iid"']


def launcher(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlora.launch", *args], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("cmd, args, says", [
    ("deploy", ['run-name="../x"'], "'run-name' must be one folder name"),
    ("deploy", ['run-name="/abs"'], "'run-name'"),
    ("deploy", ['run-name="a/b"'], "'run-name'"),
    ("sim", ['run-name="../x"'], "'run-name'"),
    ("sim", ["num-server-round=3"], "did you mean 'num-server-rounds'?"),
    ("sim", ['method="nope"'], "'method' must be one of"),
    ("sim", ['codec-up="affine:99"'], "'codec-up'"),
    ("sim", ['data-dir="missing"'], "'data-dir'"),
    ("sim", ["--resume", "no-such-run"], "no valid checkpoint"),
    ("sim", ["--nodes", "0"], "--nodes must be >= 1"),
    ("deploy", ["key-without-value"], "is not key=value"),
])
def test_refused_before_anything_is_created(cmd, args, says, tmp_path, sample_dir):
    cwd = tmp_path / "here"
    cwd.mkdir()
    res = launcher(cmd, "--work-dir", str(tmp_path / "work"), *args,
                   f'data-dir="{sample_dir}"' if "data-dir" not in str(args) else "", cwd=cwd)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("fedlora: refused: "), res.stderr
    assert says in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert res.stdout == ""
    # nothing made: no work dir (deploy: certs, keys, SuperLink state), nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]
    assert list(cwd.iterdir()) == []


class FakeCli:
    """``flwr ls --format json`` as the SuperLink answers it."""

    def __init__(self, *runs: dict, rc: int = 0) -> None:
        self.runs, self.rc, self.calls = list(runs), rc, []

    def __call__(self, args):
        self.calls.append(args)
        return subprocess.CompletedProcess(args, self.rc, json.dumps({"runs": self.runs}), "")


def flwr_result(rc: int = 0, out: str = "Successfully started run 77\nlogs...\n"):
    return subprocess.CompletedProcess(["flwr", "run"], rc, out, None)


def test_judge_reads_flowers_status_and_the_records(tmp_path):
    t0 = time.time()
    failed = {"run-id": "77", "status": "finished:failed",
              "status-details": "Simulation failed with exception: run-config 'codec-up': "
                                "unknown codec 'zip'"}
    res = judge(flwr_result(), FakeCli(failed), "c", tmp_path, t0)
    assert res.returncode == 1 and res.flwr_returncode == 0 and res.run_id == 77
    assert res.reason == "run 77 failed: run-config 'codec-up': unknown codec 'zip'"
    # the status of *this* run is asked for, by its id
    cli = FakeCli(failed)
    judge(flwr_result(), cli, "c", tmp_path, t0)
    assert cli.calls[0][-2:] == ["--run-id", "77"]
    # Flower says completed, but the ServerApp wrote no records: a failure too
    done = {"run-id": "77", "status": "finished:completed", "status-details": ""}
    res = judge(flwr_result(), FakeCli(done), "c", tmp_path, t0)
    assert res.returncode == 1 and "wrote no" in res.reason and "summary.json" in res.reason
    (tmp_path / "summary.json").write_text("{}")
    assert judge(flwr_result(), FakeCli(done), "c", tmp_path, t0).returncode == 0
    # a summary.json of an earlier run does not count
    os.utime(tmp_path / "summary.json", (t0 - 600, t0 - 600))
    assert judge(flwr_result(), FakeCli(done), "c", tmp_path, t0).returncode == 1
    # stopped, and a SuperLink that cannot be asked (it died with the run)
    stopped = {**failed, "status": "finished:stopped", "status-details": ""}
    assert "stopped" in judge(flwr_result(), FakeCli(stopped), "c", tmp_path, t0).reason
    res = judge(flwr_result(), FakeCli(rc=1), "c", tmp_path, t0)
    assert res.returncode == 1 and "did not finish (Flower status: unknown)" in res.reason
    # flwr itself failed (e.g. Flower refused the run config)
    res = judge(flwr_result(3, "x\n[code: 15] Invalid run configuration\n"), FakeCli(), "c",
                tmp_path, t0)
    assert res.returncode == 3 and res.reason.endswith("Invalid run configuration")


@pytest.mark.slow
def test_failing_serverapp_exits_1_with_its_error(tmp_path, sample_dir):
    """The config passes the launcher's check (a run folder with a checkpoints/ entry), the
    ServerApp raises CheckpointError: exit 1, its message, no ``records:`` line."""
    bad = tmp_path / "bad"
    (bad / "checkpoints").mkdir(parents=True)
    (bad / "checkpoints" / "round-1.ckpt").write_bytes(b"not a checkpoint")
    res = launcher("sim", "--work-dir", str(tmp_path / "work"), *TINY,
                   f'data-dir="{sample_dir}"', 'resume="bad"', cwd=tmp_path, timeout=600)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert last.startswith("fedlora: run failed: run ") and "no valid checkpoint" in last, last
    assert str(bad) in last                     # resume="bad" was resolved against our cwd
    assert "records:" not in res.stdout


@pytest.mark.slow
def test_serverapp_refuses_what_slips_past_the_launcher(tmp_path, sample_dir, monkeypatch):
    """A config that reaches the ServerApp without the launcher's check (as by ``flwr run .``):
    the ServerApp's own check refuses the codec, and the run is judged failed."""
    import fedlora.validate

    from fedlora.launch import pids_with_env, run_simulation

    monkeypatch.setattr(fedlora.validate, "check", lambda rc, *a, **k: dict(rc))
    rc = {**launch._parse_kv(TINY), "data-dir": sample_dir, "codec-up": "bogus",
          "run-dir": str(tmp_path / "runs"), "run-name": "x"}
    res, run_dir = run_simulation(rc, nodes=2, work_dir=tmp_path / "work", timeout=600)
    assert res.returncode != 0 and res.flwr_returncode == 0, res.stdout[-3000:]
    assert res.status == "finished:failed"
    assert "run-config 'codec-up': unknown codec 'bogus'" in res.reason, res.reason
    assert not (run_dir / "summary.json").exists()
    assert not pids_with_env(str(tmp_path / "work"))


def test_benchmark_suite_exit_status(tmp_path, monkeypatch, capsys, sample_dir):
    """benchmarks/run.py: 2 when a configuration is refused (before any run or folder), 1 when
    runs fail (the suite goes on; each FAILED line and the last line say why)."""
    import signal

    sys.path.insert(0, str(ROOT))
    import benchmarks.run as bench

    monkeypatch.setattr(signal, "signal", lambda *a: None)
    base = {**launch._parse_kv(TINY), "data-dir": sample_dir}
    spec = {"nodes": 2, "runs": {"a": base, "b": {**base, "num-server-rounds": 0}}}
    monkeypatch.setitem(bench.SUITES, "vision-quick", lambda: spec)
    out = tmp_path / "out"
    assert bench.main(["vision-quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == ("fedlora: refused: suite 'vision-quick' configuration 'b': run-config "
                   "'num-server-rounds' must be in [1, inf), got 0\n")
    assert not out.exists()

    spec["runs"]["b"] = {**base, "method": "fedavg"}
    calls = []

    def failing(rc, **kw):
        calls.append(rc["run-name"])
        res = subprocess.CompletedProcess(["flwr"], 0, "log\n", None)
        return launch.RunResult(res, f"run {len(calls)} failed: boom"), Path(rc["run-dir"])

    monkeypatch.setattr(bench, "run_simulation", failing)
    assert bench.main(["vision-quick", "--out", str(out)]) == 1
    cap = capsys.readouterr()
    assert calls == ["a", "b"]                      # the suite went on after a failure
    assert "[1/2] a: FAILED: run 1 failed: boom" in cap.out
    assert cap.err == "fedlora: 2 run(s) failed, first a: run 1 failed: boom\n"


def test_secure_deploy_without_nginx_is_refused_before_any_folder(tmp_path, monkeypatch, capsys,
                                                                  sample_dir):
    import signal

    monkeypatch.setattr(signal, "signal", lambda *a: None)
    monkeypatch.setattr(launch, "nginx_binary", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert launch.main(["deploy", "--work-dir", "w", f'data-dir="{sample_dir}"']) == 2
    assert capsys.readouterr().err.startswith("fedlora: refused: nginx not found")
    assert list(tmp_path.iterdir()) == []
