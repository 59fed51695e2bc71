"""A vision node imports only what a vision node needs (issue 38, item 4).

* :class:`fedlora.lora.LoraNet` (plain-torch LoRA for the vision task) is the model peft builds for
  the same config, tensor for tensor: names and order, initial values, outputs and gradients,
  travelling state, merged evaluation model and the saved adapter folder. So replacing peft on the
  vision path changed no number.
* A fresh process that loads the ClientApp and builds a vision task and its adapter model has not
  imported transformers or peft (nor datasets/pyarrow for that); a real round through the ClientApp
  in its own process (``benchmarks.nodeproc``: the ServerApp here, the node a child process)
  imports neither. Each fails if a top-level ``import transformers`` (or ``peft``) comes back on
  the vision path.
"""

from __future__ import annotations

import copy
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora.adapters import load_state, trainable_params, travelling_state
from fedlora.tasks.vision import VisionModelConfig, build_model, build_peft_model

ROOT = Path(__file__).resolve().parent.parent
TEXT_STACK = ("transformers", "peft", "tokenizers")


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_lora_net_is_peft_tensor_for_tensor(norm, tmp_path):
    """Same names, order, values, outputs, gradients and merged model as peft's LoRA."""
    cfg = VisionModelConfig(arch="resnet8", feature_maps=8, lora_rank=4, norm=norm, seed=5)
    ours, ref = build_model(cfg, True), build_peft_model(cfg)
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == \
        [(n, p.requires_grad) for n, p in ref.named_parameters()]
    so, sr = ours.state_dict(), ref.state_dict()
    assert list(so) == list(sr) and all(torch.equal(so[k], sr[k]) for k in so)
    to, tr = travelling_state(ours), travelling_state(ref)
    assert list(to) == list(tr) and all(torch.equal(to[k], tr[k]) for k in to)
    assert list(trainable_params(ours)) == list(trainable_params(ref))
    gen = torch.Generator().manual_seed(0)
    state = {k: (v + 0.01 * torch.randn(v.shape, generator=gen)).numpy() for k, v in to.items()}
    load_state(ours, state)
    if norm == "group":  # peft cannot load BatchNorm state without num_batches_tracked
        load_state(ref, state)
    else:
        ref.load_state_dict({k: v for k, v in ours.state_dict().items()})
    x = torch.randn(4, 3, 16, 16, generator=gen)
    yo, yr = ours(x), ref(x)
    assert torch.equal(yo, yr)
    yo.square().sum().backward()
    yr.square().sum().backward()
    go = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    gr = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert all(torch.equal(go[k], gr[k]) for k in go)
    mo, mr = copy.deepcopy(ours).merge_and_unload(), copy.deepcopy(ref).merge_and_unload()
    assert type(mo) is type(mr)
    smo, smr = mo.state_dict(), mr.state_dict()
    assert list(smo) == list(smr) and all(torch.equal(smo[k], smr[k]) for k in smo)
    mo.eval(), mr.eval()
    assert torch.equal(mo(x), mr(x))
    if norm == "group":
        ours.save_pretrained(str(tmp_path / "ours"))
        ref.save_pretrained(str(tmp_path / "ref"))
        for f in sorted(os.listdir(tmp_path / "ref")):
            assert filecmp.cmp(tmp_path / "ours" / f, tmp_path / "ref" / f, shallow=False), f


def _fresh(code: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "FEDLORA_PARTITION_CACHE": ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_vision_clientapp_and_model_import_no_text_stack(sample_dir):
    """Loading the ClientApp, building the vision task and its LoRA model and reading its
    travelling state imports none of transformers/peft/tokenizers/datasets/pyarrow."""
    got = _fresh(f"""
import json, sys
from flwr.app import Context, RecordDict
import fedlora.client_app as ca
from fedlora.config import RunConfig
from fedlora.tasks import make_task
cfg = RunConfig.from_run_config({{"dataset": "npz", "data-dir": {sample_dir!r},
                                  "feature-maps": 8, "lora-rank": 4}})
task = make_task(cfg)
shapes = ca._expected_shapes(task, True)
task.fingerprint()
watch = ("transformers", "peft", "tokenizers", "datasets", "pyarrow", "flwr_datasets")
print(json.dumps({{"n": len(shapes), "mods": [m for m in watch if m in sys.modules]}}))
""")
    assert got["n"] > 0 and got["mods"] == []


@pytest.mark.slow
def test_vision_node_round_imports_no_transformers(sample_dir, tmp_path):
    """A real round: the ServerApp here, the node's ClientApp in its own process (Flower's
    serde in between, as a SuperNode); after training, the node has imported neither
    transformers nor peft, and its reply was a real update."""
    from benchmarks.nodeproc import run_with_nodes

    rc = {"dataset": "npz", "data-dir": sample_dir, "feature-maps": 8, "lora-rank": 4,
          "num-server-rounds": 1, "method": "flocora", "min-train-nodes": 1,
          "min-available-nodes": 1, "fraction-train": 1.0, "max-examples-per-client": 64,
          "eval-max-examples": 32, "run-dir": str(tmp_path)}
    summary, nodes = run_with_nodes(rc, 1)
    (node,) = nodes.values()
    train = [r for r in node["reports"] if r["type"] == "train"]
    assert len(train) == 1 and train[0]["bytes_up"] > 1000
    assert not set(TEXT_STACK) & set(train[0]["modules"]), train[0]["modules"]
    assert summary["rounds"] == 1


def _partitions_both_ways(labels, *args):
    import warnings

    from fedlora.tasks import data as D

    out = []
    for draw in (D._draw_partitions, D.draw_partitions_numpy):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append([p.tolist() for p in draw(tuple(labels), *args)])
        except (ValueError, D.DataError) as e:
            out.append(type(e).__name__)
    return out


def test_numpy_partitions_equal_flwr_datasets():
    """Without datasets (the slim node image) a node draws the partitions flwr-datasets draws,
    index for index and error for error: 60 random label sets and parameters of the three
    schemes, min-partition-size included."""
    import numpy as np

    rng = np.random.default_rng(38)
    for _ in range(20):
        labels = rng.integers(0, int(rng.integers(2, 12)), int(rng.integers(20, 400)))
        for scheme in ("iid", "dirichlet", "pathological"):
            args = (int(rng.integers(1, 25)), scheme,
                    float(rng.choice([0.01, 0.1, 0.5, 1.0, 5.0])), int(rng.integers(0, 100)),
                    int(rng.integers(1, 4)), int(rng.choice([0, 0, 2, 5])))
            flwr, ours = _partitions_both_ways(labels, *args)
            assert flwr == ours, (scheme, args)


def test_numpy_partitions_equal_on_fashion_mnist(sample_dir):
    """The suites' setting: the sample's labels, Dirichlet(0.5) over 10, IID over 7,
    pathological 2 classes over 10."""
    from fedlora.tasks.data import load_images

    y = load_images("npz", sample_dir, "train").y
    for args in ((10, "dirichlet", 0.5, 42, 2, 0), (7, "iid", 0.5, 1, 2, 0),
                 (10, "pathological", 0.5, 3, 2, 0), (10, "dirichlet", 0.5, 1, 2, 50)):
        flwr, ours = _partitions_both_ways(y, *args)
        assert flwr == ours and isinstance(ours, list), args


def test_node_without_datasets_partitions_with_numpy(sample_dir):
    """A process where ``datasets``/``flwr_datasets`` cannot be imported still gets a client's
    data (the numpy partitions), and imports neither."""
    got = _fresh(f"""
import json, sys
sys.modules["datasets"] = None; sys.modules["flwr_datasets"] = None  # as if not installed
from fedlora.config import RunConfig
from fedlora.tasks import make_task
cfg = RunConfig.from_run_config({{"dataset": "npz", "data-dir": {sample_dir!r},
                                  "feature-maps": 8, "lora-rank": 4}})
x, y = make_task(cfg).client_data(1, 4)
print(json.dumps({{"n": len(y), "mods": [m for m in ("pyarrow", "pandas") if m in sys.modules]}}))
""")
    assert got["n"] > 0 and got["mods"] == []
