"""The client footprint benchmark's own pieces (benchmarks/footprint.py, benchmarks/nodeproc.py):
every configuration it names is a committed suite run, and a node's peak RSS is its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import footprint  # noqa: E402


def test_every_configuration_is_a_suite_run_with_one_node(tmp_path):
    """A renamed or removed suite run fails here, not after minutes of benchmark; each run is
    cut to one node that trains every round, its data partition the suite's partition 0."""
    methods = set()
    for suite, name in footprint.CONFIGS:
        rc, nodes = footprint.config_for(suite, name, 2, str(tmp_path))
        assert rc["num-server-rounds"] == 2 and rc["min-train-nodes"] == 1
        assert rc["fraction-train"] == 1.0 and nodes > 1
        methods.add(rc["method"])
    assert {"fedavg", "flocora", "flasc", "fl-lora", "ffa-lora", "flexlora", "lora-a2"} <= methods


def test_node_peak_rss_is_not_its_parents():
    """A parent holding ~400 MB starts a small child: the child's peak (VmHWM) is its own, far
    below 400 MB, while ``ru_maxrss`` there carries the parent's size over ``execve``."""
    code = ("import json, resource; from benchmarks.nodeproc import _rss_peak_bytes; "
            "print(json.dumps([_rss_peak_bytes(), "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))")
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident
    out = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True,
                         text=True, timeout=120, check=True)
    own, maxrss = json.loads(out.stdout)
    del ballast
    assert own < 200 * 2**20
    assert maxrss > 350 * 2**20  # what the benchmark would have reported with ru_maxrss
