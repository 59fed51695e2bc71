"""benchmarks/scale.py's parts that run in seconds: the report it renders from its measurements
(the marginal memory per node, the targets' verdicts) and the timing of Flower's own engine
start-up work. (A full run takes ~10 minutes: results/scale/.)"""

from __future__ import annotations

from benchmarks import scale


def _result(delta_small: float, delta_big: float) -> dict:
    def many(n, delta, r1):
        return {"nodes": n, "launcher_wall_s": 10.0, "round0_wall_s": 1.0, "round1_wall_s": r1,
                "round1_s": r1 - 1, "later_rounds_s": [1.0, 2.0], "memory_before_mb": 100.0,
                "memory_peak_mb": 100.0 + delta, "memory_delta_mb": delta,
                "flower_engine_parts": {"register_nodes_s": 0.1, "register_contexts_s": 0.5,
                                        "poll_sweep_s": 0.01}}

    return {"launch_parts": {"import_client_app_s": 2.0},
            "overhead": {"simulation_train_s": 13.0, "bare_train_s": 10.0, "ratio": 1.3,
                         "rounds_compared": [2, 3], "eval_s_total": 4.0, "round1_s": 9.0},
            "many_nodes": [many(1000, delta_small, 30.0), many(100000, delta_big, 61.0)],
            "load_average_start": 1.0, "load_average_end": 2.0}


def test_report_gives_the_marginal_memory_per_node_and_the_verdicts():
    text = "\n".join(scale.render(_result(2000.0, 2000.0 + 99 * 31 / 1024 * 1000)))
    # (delta(100k) - delta(1k)) / 99,000 nodes: the fixed 2 GB cancels
    assert "memory per node (marginal, 1,000 -> 100,000 nodes): 31.0 KB" in text
    assert "= 1.30x (target <= 1.2x: NOT met)" in text
    assert "(target round 1 <= 60 s: NOT met)" in text


def test_flowers_engine_start_is_timed_with_its_own_functions():
    parts = scale.engine_parts(200)
    assert set(parts) == {"register_nodes_s", "register_contexts_s", "poll_sweep_s"}
    assert all(v >= 0 for v in parts.values())


_COUNT_PARSES = r"""
import json, sys
from flwr.compat.client import run_info_store as S
from flwr.common import config as C
from flwr.server.superlink.fleet.vce import vce_api as V
from flwr.supercore.run import Run
parses = []
real = C.get_fused_config_from_dir
def counting(*args):
    parses.append(1)
    return real(*args)
# under the what-if, the cache wraps the original it captured at start-up: count underneath it
if "sitecustomize" in sys.modules and hasattr(sys.modules["sitecustomize"], "_parse"):
    sys.modules["sitecustomize"]._parse = counting
else:
    S.get_fused_config_from_dir = counting
stores = V._register_node_info_stores({i: i for i in range(1, 301)}, Run.create_empty(1),
                                      app_dir=sys.argv[1])
cfgs = [s.run_infos[1].initial_run_config for s in stores.values()]
print(json.dumps({"parses": len(parses), "equal": all(c == cfgs[0] for c in cfgs),
                  "distinct": len({id(c) for c in cfgs}), "method": cfgs[0].get("method")}))
"""


def _parses(whatif: bool) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if whatif:
        env["PYTHONPATH"] = str(scale.ROOT / "benchmarks" / "whatif_flower_config_cache")
    out = subprocess.run([sys.executable, "-c", _COUNT_PARSES, str(scale.ROOT)], env=env,
                         cwd=scale.ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_whatif_parses_the_app_config_once_and_gives_every_node_its_own_copy():
    """What ``--whatif-flower-config-cache`` changes, and all it changes: Flower 1.41 parses
    pyproject.toml once per node (300 here); with the what-if on PYTHONPATH, once — every node
    still gets the same configuration, in its own dict. The report says it is a what-if."""
    plain, whatif = _parses(False), _parses(True)
    assert plain["parses"] == 300 and whatif["parses"] == 1
    assert plain["equal"] and whatif["equal"] and whatif["distinct"] == 300
    assert whatif["method"] == plain["method"] == "flocora"
    text = "\n".join(scale.render({**_result(1.0, 2.0), "whatif_flower_config_cache": True}))
    assert text.startswith("WHAT-IF: Flower's engine parsing")
    assert "WHAT-IF" not in "\n".join(scale.render(_result(1.0, 2.0)))
