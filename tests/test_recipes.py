"""docs/architecture.md's "Add a method" and "Add a codec" recipes, followed end to end.

Each test does what the recipe says, step by step, with a toy: a weight-averaging method whose
server step is the examples-weighted mean times 1.0 (so a round of it must land on exactly what
``flocora``, the same client rule, lands on), and ``be32``, a value coder that sends float32
big-endian (lossless, so a round through it must equal one through ``fp32``). The module is a
real file in a temporary folder added to the package's ``__path__`` (the recipe's "one file in
``fedlora/methods/`` / ``fedlora/compression/``"), and the registration edits (``METHODS``,
the validate tables, the method help, the ``compression/__init__.py`` import) are made in
process and undone afterwards. Before each step, the test shows what goes wrong without it, so
a recipe step that stopped being needed or stopped being enough fails here.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fedlora import validate
from fedlora.compression import CodecError, SpecError, decode_payload, parse_spec
from fedlora.config import RunConfig

from conftest import InProcessGrid

TIMING = {"round_s", "wall_s", "eval_s", "checkpoint_bytes"}

# ------------------------------------------------------------------------------ add a method
# Step 1 + 2 of "Add a method": one module, server half and client half, `Strategy = ...`.
TOY_METHOD = '''
"""Toy weight-averaging method (tests/test_recipes.py): FedAvg of the adapter, times SCALE."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..adapters import load_state, num_params, state_to_numpy, travelling_state
from ..strategies.base import ClientResult, ClientRound, FedLoraStrategy, averaged
from ..strategies.protocol import TrainReply, Uploads

SCALE = 1.0
CALLS = {"aggregate": 0, "client": 0}


class ToyMean(FedLoraStrategy):
    name = "toy-mean"
    adapter = True
    uploads = Uploads.EITHER
    stream_weights = "examples"

    def aggregate_updates(self, server_round, state, updates):
        CALLS["aggregate"] += 1
        mean = averaged(self, state, updates)
        return OrderedDict((k, (v * np.float32(SCALE)).astype(np.float32))
                           for k, v in mean.items())


def client_train(cr: ClientRound) -> ClientResult:
    CALLS["client"] += 1
    model = cr.task.new_model(adapter=True)
    load_state(model, cr.received)
    data = cr.data()
    metrics = cr.task.train(model, data, seed=cr.seed, lr=cr.lr)
    upload = cr.upload_of(state_to_numpy(travelling_state(model)))
    return ClientResult(upload, TrainReply(len(data[1]), metrics,
                                           params_up=float(num_params(upload))))


Strategy = ToyMean
'''


def tiny_run_config(tmp_path, sample_dir, name, **extra):
    """A 1-round run of a tiny ResNet on the bundled Fashion-MNIST sample, 3 nodes."""
    return {"num-server-rounds": 1, "feature-maps": 8, "lora-rank": 4, "local-epochs": 1,
            "max-examples-per-client": 32, "batch-size": 16, "eval-max-examples": 64,
            "fraction-train": 1.0, "min-train-nodes": 3, "min-available-nodes": 3,
            "dataset": "npz", "partitioner": "iid", "client-threads": 1, "device": "cpu",
            "data-dir": sample_dir, "run-dir": str(tmp_path), "run-name": name, **extra}


def one_round(rc):
    """The launcher's check, then the real ServerApp loop with the real ClientApp ``train`` of
    3 in-process nodes (no Flower processes); the round records without timings."""
    from fedlora.results import read_rounds
    from fedlora.server_app import run

    checked = validate.check(rc)
    summary = run(InProcessGrid(checked), RunConfig.from_run_config(checked))
    assert summary["rounds"] == 1
    recs = read_rounds(Path(rc["run-dir"]) / rc["run-name"])
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


@pytest.fixture
def scratch_package(tmp_path, monkeypatch):
    """``add(package, module, source)``: write the module into a temporary folder on the
    package's ``__path__``; the folder and the imported module are gone after the test."""
    folder = tmp_path / "src"
    folder.mkdir()
    added = []

    def add(package: str, module: str, source: str) -> str:
        pkg = importlib.import_module(package)
        monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(folder)])
        (folder / f"{module}.py").write_text(source)
        importlib.invalidate_caches()
        added.append(f"{package}.{module}")
        return added[-1]

    yield add
    for name in added:  # the import bound it in sys.modules and as the package's attribute
        sys.modules.pop(name, None)
        package, _, module = name.rpartition(".")
        if hasattr(sys.modules[package], module):
            delattr(sys.modules[package], module)


def test_add_a_method_recipe_end_to_end(tmp_path, sample_dir, task_identity, monkeypatch,
                                        scratch_package):
    """A method added exactly as the recipe says runs a real round (ServerApp loop, ClientApp,
    query, download, streaming aggregation, records) and lands where ``flocora`` does; each
    registration step is needed: without it the run or a guarding test refuses."""
    import test_docs
    import test_validate
    from fedlora import configdoc, methods
    from fedlora.methods import METHODS, get_method

    rc = tiny_run_config(tmp_path, sample_dir, "toy", method="toy-mean")
    # steps 1-2: the module, in fedlora/methods/ (here: a folder on the package's path)
    scratch_package("fedlora.methods", "toy_mean", TOY_METHOD)

    # step 3, first half: without its line in METHODS neither the ClientApp/ServerApp lookup
    # nor the launcher's check knows the method
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("toy-mean")
    with pytest.raises(validate.ConfigError, match="'method'"):
        validate.check(rc)
    monkeypatch.setitem(METHODS, "toy-mean", "toy_mean")
    toy = get_method("toy-mean")
    assert toy.Strategy.name == "toy-mean" and toy is methods.get_method("toy-mean")

    # step 3, second half: the launcher's tables must say what the class declares; without
    # that, tests/test_validate.py fails and upload=delta is refused though the strategy takes it
    with pytest.raises(AssertionError, match="toy-mean"):
        test_validate.test_tables_mirror_the_code_they_stand_for()
    with pytest.raises(validate.ConfigError, match="upload='delta'"):
        validate.check({**rc, "upload": "delta"})
    toy.Strategy(RunConfig.from_run_config({**rc, "upload": "delta"}),
                 {"w": (2, 2)})  # the strategy itself accepts it
    monkeypatch.setattr(validate, "DELTA_UPLOAD", (*validate.DELTA_UPLOAD, "toy-mean"))
    test_validate.test_tables_mirror_the_code_they_stand_for()
    validate.check({**rc, "upload": "delta"})

    # step 4: named in the `method` help (tests/test_docs.py), which configdoc renders
    with pytest.raises(AssertionError, match="toy-mean"):
        test_docs.test_method_help_names_every_registered_method()
    field = RunConfig.__dataclass_fields__["method"]
    monkeypatch.setattr(field, "metadata", types.MappingProxyType(
        {**field.metadata, "help": field.metadata["help"] + " `toy-mean` (a test's toy)."}))
    test_docs.test_method_help_names_every_registered_method()
    assert "`toy-mean`" in configdoc.render()
    assert dataclasses.fields(RunConfig)  # the dataclass is still whole

    # the round: every node trains with the toy's client half, the server aggregates once
    got = one_round(rc)
    assert toy.CALLS == {"aggregate": 1, "client": 3}
    assert [r["round"] for r in got] == [0, 1]
    assert got[1]["clients"] == 3 and got[1]["dropped"] == 0
    # the same client rule and the mean times 1.0: flocora's round, record for record, but for
    # the method's name in each train message's config ("toy-mean" is one byte longer)
    want = one_round(tiny_run_config(tmp_path, sample_dir, "ref", method="flocora"))
    longer = len("toy-mean") - len("flocora")
    assert got[1]["bytes_down_per_node"] == {
        n: b + longer for n, b in want[1]["bytes_down_per_node"].items()}
    assert got[1]["bytes_down"] == want[1]["bytes_down"] + 3 * longer
    by_name = {"bytes_down", "bytes_down_per_node", "cum_mb_down", "cum_mb"}
    assert [{k: v for k, v in r.items() if k not in by_name} for r in got] == \
        [{k: v for k, v in r.items() if k not in by_name} for r in want]


# ------------------------------------------------------------------------------- add a codec
# Steps 1-3 of "Add a codec": one module with a registered ValueCoder stating max_expansion.
TOY_CODEC = '''
"""``be32`` (tests/test_recipes.py): float32 values sent big-endian; lossless, no arguments."""

from __future__ import annotations

import math

import numpy as np

from .arrays import check_finite
from .codec import ValueCoder, register
from .errors import CodecError


@register
class Be32(ValueCoder):
    codec_id = "be32"

    def encode_values(self, x, groups, out):
        check_finite(x)
        if x.size:
            out.append(x.reshape(-1).astype(">f4").tobytes())

    def values_size(self, x, groups):
        return 4 * x.size

    def max_values_size(self, n, groups):
        return 4 * n

    def decode_values(self, r, shape, groups, name):
        v = r.array(">f4", math.prod(shape), f"be32 values of {name!r}")
        out = v.astype(np.float32).reshape(shape)
        if out.size and not np.isfinite(out).all():
            raise CodecError(f"tensor {name!r}: NaN or Inf in decoded be32 values")
        return out

    def max_expansion(self):
        return 1.0
'''


def toy_tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {"l.lora_A": rng.standard_normal((4, 6)).astype(np.float32),
            "l.lora_B": rng.standard_normal((5, 4, 1, 1)).astype(np.float32),
            "bias": rng.standard_normal(3).astype(np.float32)}


@pytest.fixture
def private_registry(monkeypatch):
    """The codec registry as it is, in a copy the test may register into."""
    from fedlora.compression import codec

    monkeypatch.setattr(codec, "_REGISTRY", dict(codec._REGISTRY))


def test_add_a_codec_recipe_end_to_end(tmp_path, sample_dir, task_identity, private_registry,
                                       scratch_package):
    """A codec added as the recipe says: refused in a spec until its module is imported (the
    ``compression/__init__.py`` line), then encodes and decodes exactly in every chain position
    a value coder takes, survives the fuzz harness's truncations and byte mutations with only
    CodecErrors, bounds the no-shapes decode by its ``max_expansion``, and carries a real round
    both ways (codec-up and codec-down) to exactly the ``fp32`` round's records."""
    import test_codec_fuzz as fuzz

    name = scratch_package("fedlora.compression", "toy_be32", TOY_CODEC)
    # step 4: until the module is imported nothing knows the stage id
    with pytest.raises(SpecError, match="be32"):
        parse_spec("be32")
    with pytest.raises(validate.ConfigError, match="codec-up"):
        validate.check(tiny_run_config(tmp_path, sample_dir, "x", method="flocora",
                                       **{"codec-up": "be32"}))
    importlib.import_module(name)  # what `from . import ...` in compression/__init__.py does

    # step 2: no arguments (the base's from_args refuses them, naming the stage)
    with pytest.raises(SpecError, match="be32 takes no arguments"):
        parse_spec("be32:3")
    x = toy_tensors()
    for spec in ("be32", "topk:0.5|be32", "ranks|be32", "be32|zstd", "topk:0.2:tensor|be32|zstd"):
        pipe = parse_spec(spec)
        assert pipe.spec == spec
        payload = pipe.encode(x)
        ref = parse_spec(spec.replace("be32", "fp32")).encode(x)
        fp32 = parse_spec(spec.replace("be32", "fp32"))  # canonical: "fp32" left out after topk
        assert len(payload) - len(pipe.spec) == len(ref) - len(fp32.spec)  # fp32's sizes
        got = decode_payload(payload, expected={k: v.shape for k, v in x.items()})
        want = decode_payload(ref, expected={k: v.shape for k, v in x.items()})
        for k in x:
            np.testing.assert_array_equal(got[k], want[k])  # be32 is exactly fp32's values
    payload = parse_spec("be32").encode(x)
    assert payload != parse_spec("fp32").encode(x)

    # step 3: max_expansion feeds the decoder's memory contract
    assert parse_spec("be32").max_expansion == 1.0
    assert parse_spec("be32|zstd").max_expansion == 32.0

    # step 5's fuzz harness (tests/test_codec_fuzz.py): every truncation refused, every
    # mutation decoded to finite float32 or refused with an explicit CodecError
    for spec in ("be32", "topk:0.5|be32|zstd"):
        p = parse_spec(spec).encode(fuzz.tensors())
        assert fuzz.check(p) == "ok"
        for cut in range(len(p)):
            assert fuzz.check(p[:cut]) == "error", (spec, cut)
        for pos in range(len(p)):
            for new in (p[pos] ^ 0x01, p[pos] ^ 0x80, 0xFF):
                fuzz.check(p[:pos] + bytes([new]) + p[pos + 1:])
    nan = bytearray(payload)
    nan[-4:] = np.array([np.nan], ">f4").tobytes()
    with pytest.raises(CodecError, match="NaN or Inf"):
        decode_payload(bytes(nan))

    # a real round, the toy codec both ways; lossless and named as long as fp32 (the spec
    # travels in each payload's header), so the fp32 round's records exactly, bytes included
    got = one_round(tiny_run_config(tmp_path, sample_dir, "be32", method="flocora",
                                    **{"codec-up": "be32", "codec-down": "be32"}))
    want = one_round(tiny_run_config(tmp_path, sample_dir, "fp32", method="flocora",
                                     **{"codec-up": "fp32", "codec-down": "fp32"}))
    assert got[1]["clients"] == 3 and got[1]["dropped"] == 0
    assert got == want


def test_a_codec_without_max_expansion_cannot_be_decoded(private_registry, scratch_package):
    """Recipe step 3 is not optional: a stage that does not state ``max_expansion`` has no
    decoder memory bound, so a payload of it without expected shapes is refused by the
    last-resort wrapper (which the fuzz harness counts as a failure), not decoded."""
    import test_codec_fuzz as fuzz

    source = TOY_CODEC.replace('"be32"', '"be32nox"').replace(
        "    def max_expansion(self):\n        return 1.0\n", "")
    assert "max_expansion" not in source
    importlib.import_module(scratch_package("fedlora.compression", "toy_be32nox", source))
    pipe = parse_spec("be32nox")
    with pytest.raises(NotImplementedError):
        pipe.max_expansion
    payload = pipe.encode(toy_tensors())
    with pytest.raises(CodecError, match="unexpected decoder failure.*NotImplementedError"):
        decode_payload(payload)
    with pytest.raises(AssertionError, match="unexpected decoder failure"):
        fuzz.check(payload)
