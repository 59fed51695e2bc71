"""The text task: LoRA placement and the paper's parameter counts, the seeded frozen head, the
text readers (BANKING77 CSV, 20NG JSONL, the bundled BBC News corpus) and the loops."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedlora.adapters import (fingerprint, load_state, num_params, state_to_numpy,
                              travelling_state)
from fedlora.config import RunConfig
from fedlora.tasks import text_data
from fedlora.tasks.data import DataError
from fedlora.tasks.text import (BERT_TARGETS, TextModelConfig, TextTask, build_base,
                                build_model, encode, tokenizer_for, packaged_model_dir,
                                wrap_lora)
from fedlora.tasks.text_data import load_text, stratified_split

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MINILM = TextModelConfig(num_classes=5, lora_rank=4, seed=0)


def lora_modules(model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def layer_path(name: str) -> str:
    return re.sub(r"^.*?layer\.\d+\.", "", name)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def minilm_lora():
    return build_model(MINILM, adapter=True)


# ------------------------------------------------------------------------------------ model


def test_minilm_lora_placement_36_modules_head_frozen(minilm_lora):
    wrapped = lora_modules(minilm_lora)
    assert len(wrapped) == 36                                  # 6 types x 6 layers
    assert sorted({layer_path(n) for n in wrapped}) == sorted(BERT_TARGETS)
    for t in BERT_TARGETS:                                     # each type once per layer
        assert sum(layer_path(n) == t for n in wrapped) == 6
    assert not any("pooler" in n or "classifier" in n for n in wrapped)
    trainable = [n for n, p in minilm_lora.named_parameters() if p.requires_grad]
    assert len(trainable) == 72 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    head = minilm_lora.base_model.model.classifier
    assert not any(p.requires_grad for p in head.parameters())
    cfg = minilm_lora.peft_config["default"]
    assert cfg.lora_alpha == 16 and cfg.r == 4 and cfg.lora_dropout == 0.0
    q = minilm_lora.base_model.model.bert.encoder.layer[0].attention.self.query
    assert q.scaling["default"] == pytest.approx(16 / 4)
    state = travelling_state(minilm_lora)
    assert all(float(v.abs().sum()) == 0 for k, v in state.items() if "lora_B" in k)
    assert all(float(v.abs().sum()) > 0 for k, v in state.items() if "lora_A" in k)
    assert not any(k.startswith("base_model") for k in state)


def test_train_head_option_makes_head_trainable_and_travel():
    model = build_model(TextModelConfig(num_classes=5, lora_rank=2, train_head=True),
                        adapter=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier.modules_to_save" in n for n in trainable)
    state = travelling_state(model)
    assert {"classifier.weight", "classifier.bias"} <= set(state)
    assert len(lora_modules(model)) == 36
    # round trip through the wire format, head included
    sent = state_to_numpy(state)
    sent["classifier.weight"] = sent["classifier.weight"] + 1.0
    other = build_model(TextModelConfig(num_classes=5, lora_rank=2, train_head=True), True)
    load_state(other, sent)
    assert torch.equal(travelling_state(other)["classifier.weight"],
                       torch.as_tensor(sent["classifier.weight"]))


def test_full_finetuning_model_trains_all_but_the_frozen_head():
    model = build_model(TextModelConfig(num_classes=5), adapter=False)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["classifier.weight", "classifier.bias"]


def roberta_base_geometry() -> nn.Module:
    """RoBERTa-base shapes (12 layers, 768/3072) with random weights; small vocab for speed
    (the embeddings are not adapted, so the adapter counts do not depend on it)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=1000, hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12,
                        max_position_embeddings=66, num_labels=77)
    return RobertaForSequenceClassification(cfg)


def test_roberta_base_rank1_upload_counts_match_the_paper():
    model = wrap_lora(roberta_base_geometry(), rank=1)
    assert len(lora_modules(model)) == 72
    state = travelling_state(model)
    assert num_params(state) == 165_888                                   # FL+LoRA: A and B
    assert num_params({k: v for k, v in state.items() if "lora_B" in k}) == 82_944  # FFA-LoRA
    assert set(state) == {k for k in state if ".lora_A." in k or ".lora_B." in k}
    assert not any("classifier" in n for n in lora_modules(model))


def test_distilbert_naming_detected():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                           max_position_embeddings=16, num_labels=3)
    model = wrap_lora(DistilBertForSequenceClassification(cfg), rank=2)
    assert len(lora_modules(model)) == 12
    assert not any("classifier" in n for n in lora_modules(model))


def test_seeded_base_identical_across_builds_and_seed_sensitive():
    b1, b2 = build_base(TextModelConfig(num_classes=5, seed=3)), build_base(
        TextModelConfig(num_classes=5, seed=3))
    b3 = build_base(TextModelConfig(num_classes=5, seed=4))
    assert fingerprint(b1) == fingerprint(b2) != fingerprint(b3)
    # only the head depends on the seed; the pretrained encoder is the same
    assert not torch.equal(b1.classifier.weight, b3.classifier.weight)
    assert torch.equal(b1.bert.encoder.layer[0].attention.self.query.weight,
                       b3.bert.encoder.layer[0].attention.self.query.weight)
    assert float(b1.classifier.bias.detach().abs().sum()) == 0.0
    assert 0.01 < float(b1.classifier.weight.detach().std()) < 0.03      # N(0, 0.02^2)
    # global RNG untouched by building
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    build_base(TextModelConfig(num_classes=5, seed=3))
    assert torch.equal(a, torch.rand(1))


# ------------------------------------------------------------------------------------ data


def test_banking77_csv_reader_quoted_commas_and_category_order(tmp_path):
    d = tmp_path / "banking77"
    d.mkdir()
    (d / "train.csv").write_text(
        'text,category\n'
        '"How do I know if I will get my card, or if it is lost?",card_arrival\n'
        'what is the exchange rate,exchange_rate\n'
        '"He said ""hi"", then left",activate_my_card\n', encoding="utf-8")
    (d / "test.csv").write_text('text,category\n"a, b, c",exchange_rate\n', encoding="utf-8")
    (d / "categories.json").write_text(
        json.dumps(["card_arrival", "exchange_rate", "activate_my_card"]))
    train = load_text("banking77", str(tmp_path), "train")     # parent folder works too
    assert train.texts[0] == "How do I know if I will get my card, or if it is lost?"
    assert train.texts[2] == 'He said "hi", then left'
    assert train.y.tolist() == [0, 1, 2] and train.num_classes == 3
    test = load_text("banking77", str(d), "test")
    assert test.texts == ("a, b, c",) and test.y.tolist() == [1]
    # without categories.json: sorted names over both files
    (d / "categories.json").unlink()
    load_text.cache_clear()
    train = load_text("banking77", str(d), "train")
    assert train.label_names == ("activate_my_card", "card_arrival", "exchange_rate")
    assert train.y.tolist() == [1, 2, 0]
    (d / "test.csv").write_text("text,category\nx,unknown_intent\n", encoding="utf-8")
    (d / "categories.json").write_text(json.dumps(["card_arrival", "exchange_rate",
                                                   "activate_my_card"]))
    load_text.cache_clear()
    with pytest.raises(DataError, match="unknown_intent"):
        load_text("banking77", str(d), "test")


def test_20newsgroups_jsonl_gz_reader(tmp_path):
    rows = [{"text": "From: a@b\nSubject: hockey\n\nGo Leafs, caf\u00e9", "label": 1,
             "label_name": "rec.sport.hockey"},
            {"text": "God?", "label": 0, "label_name": "alt.atheism"}]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "t", "label": 2}) + "\n")
    s = load_text("20ng", str(tmp_path), "train")
    assert s.texts[0].endswith("caf\u00e9") and s.y.tolist() == [1, 0]
    assert s.num_classes == 3                                  # labels of both splits
    (tmp_path / "label_names.json").write_text(json.dumps([f"g{i}" for i in range(20)]))
    load_text.cache_clear()
    assert load_text("20newsgroups", str(tmp_path), "test").num_classes == 20
    (tmp_path / "test.jsonl").write_text('{"text": "no label"}\n')
    load_text.cache_clear()
    with pytest.raises(DataError, match="test.jsonl:1"):
        load_text("20newsgroups", str(tmp_path), "test")


def test_bundled_bbc_news_loads_with_a_deterministic_stratified_split():
    train, test = load_text("bbc-news", "", "train"), load_text("bbc-news", "", "test")
    assert train.label_names == test.label_names == (
        "business", "entertainment", "politics", "sports", "tech")
    assert (len(train), len(test)) == (1701, 426)
    assert set(train.y.tolist()) == set(test.y.tolist()) == set(range(5))
    assert not set(train.texts) & set(test.texts)              # deduplicated, disjoint
    assert all(len(t.split()) > 50 for t in test.texts[:20])    # real articles
    frac = np.bincount(test.y) / (np.bincount(test.y) + np.bincount(train.y))
    assert np.allclose(frac, 0.2, atol=0.005)                 # stratified
    text_data._embedded_all.cache_clear()
    load_text.cache_clear()
    again = load_text("bbc-news", "", "test")
    assert again.texts == test.texts and np.array_equal(again.y, test.y)
    tr, te = stratified_split(np.repeat(np.arange(3), 10), 0.2, seed=0)
    tr2, te2 = stratified_split(np.repeat(np.arange(3), 10), 0.2, seed=0)
    assert np.array_equal(te, te2) and len(te) == 6 and len(np.union1d(tr, te)) == 30


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data not present (only on the team's "
                                                 "machines)")
def test_shared_banking77_and_20newsgroups():
    b = load_text("banking77", str(SHARED), "train")
    assert (len(b), b.num_classes) == (10_003, 77)
    assert len(load_text("banking77", str(SHARED / "banking77"), "test")) == 3_080
    n = load_text("20newsgroups", str(SHARED), "test")
    assert (len(n), n.num_classes) == (7_532, 20)


def test_clipped_encoding_equals_full_encoding():
    tok = tokenizer_for(packaged_model_dir())
    texts = list(load_text("bbc-news", "", "test").texts[:40])
    texts += ["word " * 2000, "x" * 5000, "short text", "a  b\n\n" * 300,
              "a " + "y" * 1000]           # cut to "a": too short, re-encoded in full
    for max_length in (16, 64):
        full = tok(texts, truncation=True, max_length=max_length, padding="max_length",
                   return_tensors="pt")
        enc = encode(tok, texts, max_length)
        assert torch.equal(enc["input_ids"], full["input_ids"])
        assert torch.equal(enc["attention_mask"], full["attention_mask"])


# ------------------------------------------------------------------------------------ loops


def text_cfg(**kw) -> RunConfig:
    base = dict(task="text", model="minilm", dataset="bbc-news", lora_rank=4, lr=5e-3,
                batch_size=8, local_epochs=1, max_examples_per_client=16,
                eval_max_examples=24, partitioner="dirichlet", dirichlet_alpha=0.5,
                max_length=32)
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def task():
    return TextTask(text_cfg())


def test_task_data_partitions_and_fingerprint(task):
    assert task.num_classes == 5 and task.max_length == 32
    feats, y = task.client_data(1, 4)
    assert len(y) == 16 and feats["input_ids"].shape == (16, 32)
    assert int(feats["attention_mask"][:, 0].min()) == 1
    feats2, y2 = task.client_data(1, 4)
    assert torch.equal(y, y2) and torch.equal(feats["input_ids"], feats2["input_ids"])
    others = [task.client_data(i, 4)[1] for i in (0, 2, 3)]
    assert any(not torch.equal(y, o) for o in others)
    tf, ty = task.test_data()
    assert len(ty) == 24 and len(set(ty.tolist())) > 1     # not just the first class
    assert task.fingerprint() == fingerprint(task.base())
    with pytest.raises(ValueError, match="vision model"):
        TextTask(text_cfg(model="resnet8"))


def test_train_reduces_loss_and_calls_hooks(task):
    model = task.new_model(adapter=True)
    data = task.client_data(0, 4)
    before = task.evaluate(model, data)
    assert 0.0 <= before["accuracy"] <= 1.0
    calls = {"grad": 0, "step": 0}

    def grad_hook():
        calls["grad"] += 1
        assert any(p.grad is not None for p in model.parameters() if p.requires_grad)

    def step_hook():
        calls["step"] += 1

    metrics = {}
    for r in range(4):
        metrics = task.train(model, data, seed=r, grad_hook=grad_hook, step_hook=step_hook)
    assert metrics["train-steps"] == 2.0 and calls == {"grad": 8, "step": 8}
    after = task.evaluate(model, data)
    assert after["loss"] < before["loss"] - 0.05
    assert 0.0 <= after["accuracy"] <= 1.0


def test_param_groups_only_train_their_params(task):
    model = task.new_model(adapter=True)
    data = task.client_data(2, 4)
    named = dict(model.named_parameters())
    b_params = [p for n, p in named.items() if "lora_B" in n]
    a_before = {n: p.detach().clone() for n, p in named.items() if "lora_A" in n}
    task.train(model, data, seed=0, param_groups=[{"params": b_params, "lr": 2.5e-3}])
    assert all(torch.equal(named[n], v) for n, v in a_before.items())   # A untouched
    assert any(float(p.detach().abs().sum()) > 0 for p in b_params)               # B moved from 0
    # reproducible: same seed, same result (dropout draws seeded too)
    m1, m2 = task.new_model(True), task.new_model(True)
    task.train(m1, data, seed=7)
    task.train(m2, data, seed=7)
    s1, s2 = travelling_state(m1), travelling_state(m2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_bf16_autocast_option_close_to_fp32(task):
    from fedlora.tasks.text import evaluate

    model = task.new_model(adapter=True)
    feats, y = task.test_data()
    fp32 = evaluate(model, feats, y)
    bf16 = evaluate(model, feats, y, autocast=True)
    assert 0.0 <= bf16["accuracy"] <= 1.0
    assert abs(bf16["loss"] - fp32["loss"]) < 0.05 and bf16["loss"] != fp32["loss"]
    assert TextTask(text_cfg(autocast_bf16=True)).autocast
    assert TextTask(RunConfig.from_run_config(
        {"task": "text", "model": "minilm", "dataset": "bbc-news", "autocast-bf16": True})).autocast
