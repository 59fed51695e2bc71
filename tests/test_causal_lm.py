"""task="causal-lm": LoRA targets found by inspecting Llama / Qwen2 / Mistral / GPT-2 / GPT-NeoX /
BERT / DistilBERT models (and overridable), the data layouts and their response-only loss mask
checked token by token, bad data refused before training with the file and row named, every
method through a real ServerApp round (in process), codecs / delta downloads / error feedback /
DP / resume, peft interop of the saved adapter, and one real Flower simulation (slow).

Models are random-init from configs (hidden 32, 2 layers) with a byte-level BPE tokenizer
trained in the test (tests/lm_tiny.py): everything offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lm_tiny
from fedlora.config import RunConfig
from fedlora.tasks import lm_data, lora_targets
from fedlora.tasks.data import DataError
from fedlora.validate import ConfigError, check

FAMILIES = ("llama", "gpt2", "gpt_neox")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("causal")


@pytest.fixture(scope="module")
def alpaca_dir(root):
    d = root / "alpaca"
    lm_tiny.write_jsonl(d / "train.jsonl", lm_tiny.alpaca_rows(40))
    return d


def model_dir(root, family="llama", **kw) -> Path:
    return lm_tiny.model_dir(root, family, **kw)


def base_rc(root, alpaca_dir, **kw) -> dict:
    rc = {"task": "causal-lm", "model": str(model_dir(root)), "data-dir": str(alpaca_dir),
          "method": "fl-lora", "num-server-rounds": 1, "lora-rank": 4, "lr": 1e-2,
          "batch-size": 8, "max-length": 192, "partitioner": "iid", "fraction-train": 1.0,
          "min-train-nodes": 2, "min-available-nodes": 2, "max-examples-per-client": 12,
          "run-dir": str(root / "runs"), "device": "cpu", "client-threads": 1}
    rc.update(kw)
    return rc


# ------------------------------------------------------------------------------ LoRA targets


def tiny_encoder(kind: str):
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification)

    if kind == "bert":
        return BertForSequenceClassification(BertConfig(
            vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16))
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=50, dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=16))


def tiny_decoder(kind: str):
    from transformers import (MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, SmolLM3Config,
                              SmolLM3ForCausalLM)

    common = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  pad_token_id=0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common))
    if kind == "smollm3":  # SmolLM 1 and 2 are LlamaForCausalLM; SmolLM3 has its own class
        return SmolLM3ForCausalLM(SmolLM3Config(**common))
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**common))
    return lm_tiny.model(kind, 50, 0)


@pytest.mark.parametrize("kind,family", [
    ("llama", "llama"), ("qwen2", "llama"), ("qwen3", "llama"), ("mistral", "llama"),
    ("smollm3", "llama"), ("gpt2", "gpt2"),
    ("gpt_neox", "gpt_neox"), ("bert", "bert"), ("distilbert", "distilbert")])
def test_automatic_targets_are_each_familys_projections(kind, family):
    """The rule (every Linear/Conv1D inside the repeated blocks) yields the usual per-family list,
    never an embedding, head or lm_head, and peft wraps each of them in every block."""
    from peft.tuners.lora import LoraLayer

    model = tiny_encoder(kind) if kind in ("bert", "distilbert") else tiny_decoder(kind)
    assert lora_targets.detect_targets(model) == lora_targets.FAMILY_TARGETS[family]
    wrapped = lora_targets.wrap(model, rank=2, alpha=4)
    names = [n for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)]
    assert len(names) == 2 * len(lora_targets.FAMILY_TARGETS[family])
    assert not any(h in n for n in names for h in ("lm_head", "classifier", "embed", "wte",
                                                   "pooler"))
    cfg = wrapped.peft_config["default"]
    assert cfg.fan_in_fan_out == (kind == "gpt2")          # GPT-2's Conv1D is transposed
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_lora_targets_override_any_architecture():
    """Entries by name or path, exact path first (BERT's output.dense is not attention.output.
    dense), and an entry that matches nothing names itself and the block's projections."""
    llama = tiny_decoder("llama")
    assert [n.split(".", 3)[-1] for n in lora_targets.match_modules(
        llama, ("q_proj", "v_proj"))] == ["self_attn.q_proj", "self_attn.v_proj"] * 2
    gpt2 = tiny_decoder("gpt2")
    assert lora_targets.match_modules(gpt2, ("c_attn",)) == ["transformer.h.0.attn.c_attn",
                                                             "transformer.h.1.attn.c_attn"]
    # GPT-2's c_proj is in attn and mlp: the name matches both, a path one
    assert len(lora_targets.match_modules(gpt2, ("c_proj",))) == 4
    assert len(lora_targets.match_modules(gpt2, ("mlp.c_proj",))) == 2
    bert = tiny_encoder("bert")
    out = lora_targets.match_modules(bert, ("output.dense",))
    assert out == [f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)]
    assert len(lora_targets.match_modules(bert, ("dense",))) == 6  # by name: all three denses
    with pytest.raises(ValueError, match=r"'k_lin'.*model\.layers.*self_attn\.q_proj"):
        lora_targets.match_modules(llama, ("k_lin",))


def test_text_task_lora_targets_on_a_non_bert_encoder():
    """fedlora/tasks/text.py no longer needs ``layer.<i>.`` names: the text task's wrap takes
    any encoder and lora-targets by name."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from fedlora.tasks.text import wrap_lora

    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=32, n_layer=2,
                                                     n_head=2, n_positions=16, num_labels=3))
    wrapped = wrap_lora(model, rank=2, targets=("c_attn", "c_fc"))
    from peft.tuners.lora import LoraLayer
    assert sum(isinstance(m, LoraLayer) for m in wrapped.modules()) == 4


# ------------------------------------------------------------------------------ data layouts


def labelled_spans(ids, labels):
    """Maximal runs of labelled positions: [(start, end)]."""
    spans, start = [], None
    for i, v in enumerate(labels + [-100]):
        if v != -100 and start is None:
            start = i
        elif v == -100 and start is not None:
            spans.append((start, i))
            start = None
    return spans


def rows_of(tmp_path, rows, name="train.jsonl"):
    p = lm_tiny.write_jsonl(tmp_path / name, rows)
    return lm_data.read_rows(str(p))


def test_alpaca_response_only_mask_token_by_token(tmp_path):
    """Labels are -100 on every prompt token (BOS included) and equal to the ids on exactly the
    response's tokens followed by EOS; the prompt is the Alpaca template."""
    tok = lm_tiny.tokenizer(bos=True)
    rows = rows_of(tmp_path, [{"instruction": "sum up", "input": "the cat sat",
                               "output": "a cat sat down"},
                              {"instruction": "say hi", "output": "hi there"}])
    enc = lm_data.encode_rows(rows, np.arange(2), "auto", tok, 512)
    assert enc.fmt == "alpaca"
    for i, (instr, inp, out) in enumerate([("sum up", "the cat sat", "a cat sat down"),
                                           ("say hi", "", "hi there")]):
        ids, labels = enc.ids[i], enc.labels[i]
        tmpl = lm_data.ALPACA_PROMPT if inp else lm_data.ALPACA_PROMPT_NO_INPUT
        prompt = [tok.bos_token_id] + tok(tmpl.format(instruction=instr, input=inp),
                                          add_special_tokens=False)["input_ids"]
        answer = tok(out, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == prompt + answer
        assert labels == [-100] * len(prompt) + answer
        assert enc.prompt_len[i] == len(prompt)
    # truncation keeps the first max-length tokens
    short = lm_data.encode_rows(rows, np.arange(1, 2), "alpaca", tok, enc.prompt_len[1] + 2)
    assert short.ids[0] == enc.ids[1][: enc.prompt_len[1] + 2]
    assert short.labels[0][-2:] == enc.ids[1][enc.prompt_len[1]: enc.prompt_len[1] + 2]


def test_chat_template_path_labels_each_assistant_turn(tmp_path):
    """With a chat template the labelled spans are exactly each assistant turn's content and its
    end-of-turn (<|im_end|> and newline), rendered by the template; the whole sequence is the
    template's rendering of the chat."""
    tok = lm_tiny.tokenizer(chat_template=True)
    chats = lm_tiny.chat_rows(2)
    rows = rows_of(tmp_path, chats)
    enc = lm_data.encode_rows(rows, np.arange(2), "auto", tok, 1024)
    assert enc.fmt == "chat"
    for i, row in enumerate(chats):
        msgs = row["messages"]
        ids, labels = enc.ids[i], enc.labels[i]
        assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
        spans = labelled_spans(ids, labels)
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert [tok.decode(ids[s:e]) for s, e in spans] == [a + "<|im_end|>\n" for a in answers]
        assert all(labels[k] == ids[k] for s, e in spans for k in range(s, e))
        first = tok.decode(ids[: enc.prompt_len[i]])
        assert first.endswith("<|im_start|>assistant\n") and answers[0] not in first


def test_chat_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """A template whose rendering of a prefix is not a prefix of the whole (here: turns in
    reverse order) cannot mark the assistant turns: refused naming the row."""
    tok = lm_tiny.tokenizer()
    tok.chat_template = ("{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match=r"c\.jsonl:1: the tokenizer's chat template does not"):
        lm_data.encode_rows(rows_of(tmp_path, lm_tiny.chat_rows(1), "c.jsonl"), np.arange(1),
                            "chat", tok, 1024)


def test_chat_fallback_without_template(tmp_path):
    """No chat template: the documented '### Role:' rendering; labelled = content + EOS."""
    tok = lm_tiny.tokenizer()
    chats = lm_tiny.chat_rows(1)
    enc = lm_data.encode_rows(rows_of(tmp_path, chats), np.arange(1), "chat", tok, 1024)
    ids, labels = enc.ids[0], enc.labels[0]
    answers = [m["content"] for m in chats[0]["messages"] if m["role"] == "assistant"]
    spans = labelled_spans(ids, labels)
    assert [ids[s:e] for s, e in spans] == [
        tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
    text = tok.decode(ids)
    assert text.startswith("### System:\nbe brief\n\n### User:\n") and "### Assistant:\n" in text


def test_csv_and_parquet_read_like_jsonl(tmp_path):
    """The same alpaca rows from JSONL, CSV, parquet and gzipped JSONL (and a chat whose
    messages are JSON text in a CSV cell, or a list of structs in parquet) tokenize to the same
    ids and labels."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = lm_tiny.tokenizer()
    rows = lm_tiny.alpaca_rows(6)
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    encs = [lm_data.encode_rows(lm_data.read_rows(str(p)), np.arange(6), "auto", tok, 512)
            for p in (lm_tiny.write_jsonl(tmp_path / "a.jsonl", rows), tmp_path / "a.csv",
                      tmp_path / "a.parquet")]
    assert encs[0].ids == encs[1].ids == encs[2].ids and encs[0].labels == encs[2].labels
    chats = lm_tiny.chat_rows(2)
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerows([[json.dumps(c["messages"])] for c in chats])
    a = lm_data.encode_rows(lm_data.read_rows(str(tmp_path / "c.csv")), np.arange(2), "auto",
                            tok, 1024)
    b = lm_data.encode_rows(rows_of(tmp_path, chats, "c.jsonl"), np.arange(2), "auto", tok, 1024)
    assert a.fmt == "chat" and a.ids == b.ids and a.labels == b.labels
    # a chat in parquet (messages: a list of structs) and alpaca rows in .jsonl.gz
    import gzip

    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "c.parquet")
    c = lm_data.encode_rows(lm_data.read_rows(str(tmp_path / "c.parquet")), np.arange(2),
                            "auto", tok, 1024)
    assert c.fmt == "chat" and c.ids == b.ids and c.labels == b.labels
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    gz = lm_data.encode_rows(lm_data.read_rows(str(tmp_path / "a.jsonl.gz")), np.arange(6),
                             "auto", tok, 512)
    assert gz.ids == encs[0].ids and gz.labels == encs[0].labels


def test_text_layout_and_packing(tmp_path):
    """Plain text: every token but the first has a loss; packing concatenates a client's
    examples in order and cuts max-length chunks."""
    tok = lm_tiny.tokenizer()
    texts = lm_tiny.corpus(10)
    enc = lm_data.encode_rows(rows_of(tmp_path, [{"text": t} for t in texts]),
                              np.arange(10), "auto", tok, 64)
    assert enc.fmt == "text" and all(lab == ids for ids, lab in zip(enc.ids, enc.labels))
    ids, labels = lm_data.pack(enc.ids, enc.labels, 16)
    assert all(len(c) <= 16 for c in ids) and all(len(c) == 16 for c in ids[:-1])
    assert sum(ids, []) == sum(enc.ids, [])[: len(sum(ids, []))]


def test_partitions_iid_dirichlet_and_natural(root, alpaca_dir):
    """Every scheme splits the training rows into disjoint partitions covering them; natural
    gives each user (partition column value) whole to one partition."""
    from fedlora.tasks.causal import CausalLMTask

    def parts(**kw):
        cfg = RunConfig.from_run_config(base_rc(root, alpaca_dir, **{
            "max-examples-per-client": 0, "min-partition-size": 0, **kw}))
        task = CausalLMTask(cfg)
        return task, [task.partition(task.train_enc, p, 3) for p in range(3)]

    for kw in ({"partitioner": "iid"},
               {"partitioner": "dirichlet", "partition-column": "category"},
               {"partitioner": "natural", "partition-column": "user"}):
        task, ps = parts(**kw)
        n = len(task.train_enc.ids)
        assert sorted(np.concatenate(ps).tolist()) == list(range(n)), kw
    groups = task.train_enc.groups
    owner = {}
    for p, idx in enumerate(ps):
        for i in idx:
            assert owner.setdefault(groups[i], p) == p       # a user in one partition only
    assert len(set(owner.values())) == 3


# ------------------------------------------------------------------------------ bad data


BAD = [
    ("missing-column", lambda d: lm_tiny.write_jsonl(d / "train.jsonl", [
        {"instruction": "a", "output": "b"}, {"instruction": "c"}]),
     r"train\.jsonl:2: missing column 'output'"),
    ("empty-response", lambda d: lm_tiny.write_jsonl(d / "train.jsonl", [
        {"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b"},
        {"instruction": "c", "output": "  "}]), r"train\.jsonl:3: empty response"),
    ("no-assistant", lambda d: lm_tiny.write_jsonl(d / "train.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}]}]), r"train\.jsonl:1: no assistant"),
    ("wrong-file-type", lambda d: (d / "train.txt").write_text("hello\n"),
     r"train\.txt: file type not readable"),
    ("not-json", lambda d: (d / "train.jsonl").write_text('{"text": "a"}\nnot json\n'),
     r"train\.jsonl:2: not a JSON object"),
    ("not-parquet", lambda d: (d / "train.parquet").write_text("text\nhello\n"),
     r"train\.parquet: not a parquet file"),
    ("csv-missing-column", lambda d: (d / "train.csv").write_text(
        "instruction,output\na,b\nc,\n"), r"train\.csv row 2: empty response"),
    ("content-parts", lambda d: lm_tiny.write_jsonl(d / "train.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": "yo"}]}]),
     r"train\.jsonl:2: message 0's 'content' is a list, not text"),
    ("object-cell", lambda d: lm_tiny.write_jsonl(d / "train.jsonl", [
        {"instruction": "a", "output": {"answer": "b"}}]),
     r"train\.jsonl:1: column 'output' holds a dict, not text"),
    ("test-split-bad", lambda d: (lm_tiny.write_jsonl(d / "train.jsonl", [{"text": "a b"}]),
                                  lm_tiny.write_jsonl(d / "test.jsonl", [{"txt": "a"}])),
     r"test\.jsonl:1: missing column 'text'"),
]


@pytest.mark.parametrize("name,make,message", BAD, ids=[b[0] for b in BAD])
def test_bad_data_refused_by_the_launchers_check(root, tmp_path, name, make, message):
    """One ConfigError naming the file and the row, from the launcher's check (no tokenizer,
    no torch model, before any process starts)."""
    d = tmp_path / name
    d.mkdir()
    make(d)
    lm_data.read_rows.cache_clear()
    with pytest.raises(ConfigError, match=message) as err:
        check(base_rc(root, d), hub_offline=True)
    assert "\n" not in str(err.value) and str(d) in str(err.value)


def test_all_truncated_responses_refused_before_training(root, alpaca_dir):
    """A max-length that leaves a row no response token stops the ServerApp's task build (before
    round 1) naming the first such row."""
    from fedlora.tasks.causal import CausalLMTask

    cfg = RunConfig.from_run_config(base_rc(root, alpaca_dir, **{"max-length": 40}))
    with pytest.raises(DataError, match=r"train\.jsonl:\d+: the response starts at token \d+, "
                                        r"at or after max-length 40"):
        CausalLMTask(cfg)
    with pytest.raises(ValueError, match="max-length 300 exceeds the 256 positions"):
        CausalLMTask(RunConfig.from_run_config(base_rc(root, alpaca_dir, **{"max-length": 300})))


def test_config_checks_of_the_causal_task(root, alpaca_dir, tmp_path):
    """Refused with one line: no model folder, a vision model, natural/dirichlet without a
    column, a quantized base on a CPU (bitsandbytes runs on CUDA only) or fully fine-tuned,
    a causal-LM-only key on another task (it would be ignored)."""
    ok = check(base_rc(root, alpaca_dir), hub_offline=True)
    assert ok["model"] == str(model_dir(root))
    cases = [({"model": str(tmp_path / "none")}, "is not a Hugging Face model folder"),
             ({"model": "resnet8"}, "needs run-config 'model' = a local"),
             ({"partitioner": "natural"}, "needs run-config 'partition-column'"),
             ({"partitioner": "natural", "partition-column": "nope"},
              "missing partition column 'nope'"),
             ({"quantize": "4bit"}, "quantize='4bit' needs a CUDA GPU with bitsandbytes"),
             ({"quantize": "8bit", "method": "fedavg"}, "cannot be fully fine-tuned"),
             ({"task": "text", "dataset": "bbc-news", "model": "minilm", "data-dir": "",
               "gradient-checkpointing": True}, "'gradient-checkpointing' is for task='causal"),
             ({"data-dir": ""}, "needs run-config 'data-dir'")]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            check(base_rc(root, alpaca_dir, **kw), hub_offline=True)
    with pytest.raises(ConfigError, match="partitioner 'natural'"):
        check({"partitioner": "natural"})


# ------------------------------------------------------------------------------ model, loops


def test_eval_loss_is_hf_loss_on_labelled_tokens_and_training_lowers_it(root, alpaca_dir):
    """Held-out loss = Hugging Face's own causal-LM loss with our labels (mean over labelled
    tokens, shifted), perplexity = exp(loss); a few local epochs lower the training loss."""
    from fedlora.tasks.causal import CausalLMTask, evaluate

    task = CausalLMTask(RunConfig.from_run_config(base_rc(root, alpaca_dir)))
    model = task.new_model(adapter=True)
    feats, y = task.test_data()
    ours = evaluate(model, {k: v[:1] for k, v in feats.items()}, y[:1])
    with torch.no_grad():
        hf = model(**{k: v[:1] for k, v in feats.items()}, labels=y[:1]).loss
    assert ours["loss"] == pytest.approx(float(hf), rel=1e-5)
    full = task.evaluate(model, (feats, y))
    assert full["perplexity"] == pytest.approx(math.exp(full["loss"]))
    data = task.client_data(0, 2)
    first = task.train(model, data, seed=0)["train-loss"]
    for r in range(1, 4):
        last = task.train(model, data, seed=r, epochs=5, lr=5e-2)["train-loss"]
    assert last < first - 0.05   # a random base's logits are tiny: LoRA moves them slowly


def test_gradient_checkpointing_same_gradients_and_bf16_autocast(root, alpaca_dir):
    """gradient-checkpointing recomputes activations: the LoRA gradients equal those without it;
    autocast-bf16 gives a close loss, in evaluation and in local training on the CPU."""
    from fedlora.tasks.causal import CausalLMTask, batch_of, evaluate, token_losses

    grads = []
    for gc in (False, True):
        task = CausalLMTask(RunConfig.from_run_config(base_rc(
            root, alpaca_dir, **{"gradient-checkpointing": gc})))
        model = task.new_model(adapter=True)
        assert model.base_model.model.is_activation_checkpointing == gc
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        model.train()
        xb, yb = batch_of(*task.client_data(0, 2), torch.arange(4))
        loss, mask = token_losses(model(**xb).logits, yb)
        (loss.sum() / mask.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
    feats, y = task.test_data()
    fp32, bf16 = evaluate(model, feats, y), evaluate(model, feats, y, autocast=True)
    assert abs(fp32["loss"] - bf16["loss"]) < 0.1
    # training under autocast-bf16 runs on the CPU too (torch's CPU autocast): the same first
    # step's loss as fp32 to bf16 precision, and the LoRA factors move and stay finite
    losses = []
    for bf in (False, True):
        task = CausalLMTask(RunConfig.from_run_config(base_rc(
            root, alpaca_dir, **{"autocast-bf16": bf})))
        model = task.new_model(adapter=True)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        losses.append(task.train(model, task.client_data(0, 2), seed=0)["train-loss"])
        after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        assert all(torch.isfinite(after[n]).all() for n in after)
        assert any(not torch.equal(before[n], after[n]) for n in after)
    assert losses[0] != losses[1] and losses[1] == pytest.approx(losses[0], abs=0.1)


# ------------------------------------------------------------------------------ full rounds


def server_run(rc: dict, **grid_kw):
    from conftest import InProcessGrid
    from fedlora.server_app import run

    return run(InProcessGrid(rc, **grid_kw), RunConfig.from_run_config(rc))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


METHOD_KW = {"flasc": {"density-down": 0.5, "density-up": 0.5}, "ffa-lora": {"packing": True},
             "lora-a2": {"rank-budget": 1}, "flexlora": {"rank-budget": 2},
             "hetlora": {"rank-budget": 2, "tier-map": "0,1", "tier-rank": "1,2"}}


LORA_METHODS = ("fl-lora", "ffa-lora", "flasc", "lora-a2", "flexlora", "hetlora")


@pytest.mark.parametrize("family,method", [(f, m) for f in FAMILIES for m in LORA_METHODS]
                         + [("llama", "flocora"), ("llama", "fedavg")])
def test_every_method_runs_a_real_round(root, alpaca_dir, task_identity, family, method):
    """The real ServerApp and ClientApp (in process, 2 nodes): one round with every reply
    aggregated, a held-out loss and perplexity recorded before and after it, for each LoRA
    method on a Llama, a GPT-2 (Conv1D) and a GPT-NeoX model (FLoCoRA and full fine-tuning on
    Llama: its final model saved as a Hugging Face folder that loads and scores the same)."""
    name = f"m-{family}-{method}"
    server_run(base_rc(root, alpaca_dir, method=method, model=str(model_dir(root, family)),
                       **{"run-name": name}, **METHOD_KW.get(method, {})), node_ids=(1, 2))
    recs = records(root / "runs" / name)
    assert [r["round"] for r in recs] == [0, 1]
    assert recs[1]["clients"] == 2 and recs[1]["dropped"] == 0 and recs[1]["failures"] == 0
    for r in recs:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"])) and r["loss"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0              # next-token accuracy
    assert recs[1]["loss"] != recs[0]["loss"]       # the global model changed
    if method == "fedavg":  # full fine-tuning: <run>/model, loadable as it is (same final loss)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from fedlora.tasks.causal import CausalLMTask, evaluate

        folder = root / "runs" / name / "model"
        AutoTokenizer.from_pretrained(str(folder))
        saved = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        task = CausalLMTask(RunConfig.from_run_config(base_rc(root, alpaca_dir)))
        assert evaluate(saved, *task.test_data())["loss"] == pytest.approx(recs[1]["loss"],
                                                                           rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_other_families_run_a_compressed_round(root, alpaca_dir, task_identity, family):
    """GPT-2 (Conv1D) and GPT-NeoX through a round with 1-bit delta uploads, delta downloads and
    error feedback at both ends; with eval-every=2 the held-out perplexity is recorded before
    round 1 and after round 2 only, and the summary's final_perplexity is the last one."""
    name = f"f-{family}"
    summary = server_run(base_rc(root, alpaca_dir, model=str(model_dir(root, family)), **{
        "run-name": name, "num-server-rounds": 2, "eval-every": 2, "upload": "delta",
        "download": "delta", "codec-up": "sign:tensor|zstd", "codec-down": "sign:tensor|zstd",
        "codec-down-full": "affine:8|zstd", "error-feedback": True}), node_ids=(1, 2))
    recs = records(root / "runs" / name)
    assert [r["clients"] for r in recs[1:]] == [2, 2] and not any(r["dropped"] for r in recs)
    fp32 = 4 * recs[1]["params_up"]
    assert recs[2]["payload_up"] < 0.2 * fp32       # ~1 bit a value both ways
    assert [r.get("perplexity") is not None for r in recs] == [True, False, True]
    assert summary["final_perplexity"] == recs[2]["perplexity"]


@pytest.mark.parametrize("dp", ["local", "central"])
def test_dp_round(root, alpaca_dir, task_identity, dp):
    """Local DP (clip + noise at the node) and central DP (nodes clip, the server noises the
    sum) on a causal LM: the round completes with both replies, ε recorded."""
    name = f"dp-{dp}"
    rc = base_rc(root, alpaca_dir, **{"run-name": name, "dp": dp, "dp-clip": 0.5,
                                      "upload": "delta", "dp-noise-multiplier": 0.1})
    if dp == "central":  # a fixed clip: no norm bound from the other clients' norms
        rc.update({"norm-bound-factor": 0, "update-norm-bound": 0})
    check(rc, hub_offline=True)
    server_run(rc, node_ids=(1, 2))
    rec = records(root / "runs" / name)[1]
    assert rec["clients"] == 2 and rec["dropped"] == 0 and any(k.startswith("dp_") for k in rec)


def test_tiers_round(root, alpaca_dir, task_identity):
    """Per-tier FLASC densities and upload codecs on a causal LM (tier-map over the two nodes):
    the round completes and the low tier's upload is the smaller one."""
    name = "tiers"
    server_run(base_rc(root, alpaca_dir, method="flasc", **{
        "run-name": name, "tier-map": "0,1", "tier-density": "0.25,1",
        "tier-codec-up": "affine:4|zstd,fp32"}), node_ids=(1, 2))
    rec = records(root / "runs" / name)[1]
    assert rec["clients"] == 2 and rec["dropped"] == 0 and rec["failures"] == 0
    up = rec["bytes_up_per_node"]
    assert len(up) == 2 and min(up.values()) < 0.3 * max(up.values())


def test_resume_and_peft_interop_and_generations(root, alpaca_dir, task_identity):
    """A run crashed after round 1 and resumed ends with the uninterrupted run's adapter, bit for
    bit; the saved adapter loads with PeftModel.from_pretrained and gives the same logits, merged
    too; generations.jsonl holds the fixed prompts' greedy outputs at each evaluation."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import Crash

    kw = {"num-server-rounds": 2, "generate-prompts": 2, "generate-max-new-tokens": 4}
    server_run(base_rc(root, alpaca_dir, **{"run-name": "whole", **kw}), node_ids=(1, 2))
    crashed = base_rc(root, alpaca_dir, **{"run-name": "cut", **kw})
    with pytest.raises(Crash):
        server_run(crashed, node_ids=(1, 2), crash_at=2)
    server_run({**crashed, "resume": str(root / "runs" / "cut")}, node_ids=(1, 2))
    a = torch.load(root / "runs" / "whole" / "checkpoint.pt", weights_only=False)["travelling"]
    b = torch.load(root / "runs" / "cut" / "checkpoint.pt", weights_only=False)["travelling"]
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)

    gens = [json.loads(x) for x in
            (root / "runs" / "whole" / "generations.jsonl").read_text().splitlines()]
    assert [(g["round"], g["prompt_index"]) for g in gens] == [(r, i) for r in (0, 1, 2)
                                                                 for i in (0, 1)]
    assert all(g["prompt"].endswith("### Response:\n") for g in gens)

    from fedlora.adapters import load_state
    from fedlora.tasks.causal import CausalLMTask

    task = CausalLMTask(RunConfig.from_run_config(base_rc(root, alpaca_dir)))
    ours = task.new_model(adapter=True)
    load_state(ours, a)
    x = task.test_data()[0]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir(root)), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(root / "runs" / "whole" / "adapter"))
    ours.eval()
    peft_model.eval()
    with torch.no_grad():
        want = ours(**x).logits
        got = peft_model(**x).logits
        merged = peft_model.merge_and_unload()(**x).logits
    assert torch.allclose(want, got, atol=1e-5) and torch.allclose(want, merged, atol=1e-4)
    assert all(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained


@pytest.mark.parametrize("family,method", [("gpt2", "fl-lora"), ("gpt_neox", "hetlora")])
def test_saved_adapter_loads_in_peft_for_conv1d_and_heterogeneous_ranks(
        root, alpaca_dir, task_identity, family, method):
    """The external-harness hook (``<run>/adapter``) beyond Llama + FL-LoRA: GPT-2's transposed
    Conv1D targets (peft's ``fan_in_fan_out``) and HetLoRA's per-tier ranks (the global adapter
    at the full rank) load with ``PeftModel.from_pretrained`` pointing at the model folder
    named in ``adapter_config.json``, and give fedlora's logits, merged too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.tasks.causal import CausalLMTask

    name = f"peft-{family}-{method}"
    rc = base_rc(root, alpaca_dir, method=method, model=str(model_dir(root, family)),
                 **{"run-name": name, "lr": 5e-2}, **METHOD_KW.get(method, {}))
    server_run(rc, node_ids=(1, 2))
    run = root / "runs" / name
    acfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(model_dir(root, family))
    assert acfg["r"] == 4 and acfg["fan_in_fan_out"] == (family == "gpt2")
    task = CausalLMTask(RunConfig.from_run_config(rc))
    ours = task.new_model(adapter=True)
    ours.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False)["state_dict"])
    base = AutoModelForCausalLM.from_pretrained(acfg["base_model_name_or_path"],
                                                dtype=torch.float32)
    x = task.test_data()[0]
    with torch.no_grad():
        plain = base(**x).logits
        peft_model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
        want, got = ours.eval()(**x).logits, peft_model(**x).logits
        merged = peft_model.merge_and_unload()(**x).logits
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter changed the model
    assert torch.allclose(want, got, atol=1e-5) and torch.allclose(want, merged, atol=1e-4)


@pytest.mark.slow
def test_real_flower_simulation(root, alpaca_dir, tmp_path):
    """``flwr run`` (SuperLink, SuperNodes, Ray) with task='causal-lm': 2 rounds, chat data with
    a template, natural partitions; every process gone afterwards."""
    from conftest import simulate

    chat = tmp_path / "chat"
    rows = lm_tiny.chat_rows(24)
    for i, r in enumerate(rows):
        r["user"] = f"u{i % 4}"
    lm_tiny.write_jsonl(chat / "train.jsonl", rows)
    rc = base_rc(root, chat, model=str(model_dir(root, chat_template=True)),
                 **{"num-server-rounds": 2, "partitioner": "natural", "partition-column": "user",
                    "run-name": "sim", "run-dir": str(tmp_path / "runs"), "max-length": 256})
    rounds, meta, _, _ = simulate(tmp_path / "work", rc)
    assert [r["round"] for r in rounds] == [0, 1, 2] and meta["config"]["task"] == "causal-lm"
    assert all(r["clients"] == 2 and r["dropped"] == 0 for r in rounds[1:])
    assert all(math.isfinite(r["perplexity"]) for r in rounds)


# ------------------------------------------------------------------------------ evidence suite


def test_evidence_suite_configs_pass_on_prepared_inputs(root, tmp_path, monkeypatch):
    """The causal-shakespeare suite's every configuration passes the launcher's check once its
    inputs exist (a tiny stand-in model; data in the prep script's layout, made by its own
    speech parser from a play-like text)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import causal_prep
    from benchmarks.suites import SUITES

    play = ("ACT I.\n\nPROSPERO.\nTwelve year since, Miranda,\ntwelve year since.\n\n"
            "MIRANDA.\nSir, are not you my father? [Aside.]\n\n[Enter Ariel.]\n\n"
            "First Citizen.\nBefore we proceed any further, hear me speak.\n\n")
    assert causal_prep.speeches(play) == [
        ("PROSPERO", "Twelve year since, Miranda, twelve year since."),
        ("MIRANDA", "Sir, are not you my father?"),
        ("FIRST CITIZEN", "Before we proceed any further, hear me speak.")]
    prep = tmp_path / "prep"
    (prep / "model").parent.mkdir(parents=True)
    import shutil
    shutil.copytree(model_dir(root, "gpt2"), prep / "model")
    rows = [{"text": s, "role": f"tempest/{r}"} for r, s in causal_prep.speeches(play)] * 10
    lm_tiny.write_jsonl(prep / "shakespeare" / "train.jsonl", rows)
    lm_tiny.write_jsonl(prep / "shakespeare" / "test.jsonl", rows[:3])
    monkeypatch.setenv("FEDLORA_CAUSAL_PREP", str(prep))
    spec = SUITES["causal-shakespeare"]()
    assert spec["seeds"] == [1, 2, 3] and len(spec["runs"]) >= 5
    for name, rc in spec["runs"].items():
        check(rc, hub_offline=True)


def test_natural_partition_with_too_few_users_refused_by_the_launcher(root, tmp_path):
    """``partitioner='natural'`` gives each node of a simulation one value of the partition
    column at least: with fewer distinct values in the training rows than ``--nodes`` the
    launcher refuses in one line naming the file, before any Flower process (a node without a
    user would otherwise fail in round 1, after the others trained)."""
    import argparse

    from fedlora import launch

    d = tmp_path / "users"
    lm_tiny.write_jsonl(d / "train.jsonl", lm_tiny.alpaca_rows(40))  # users u0..u4
    lm_tiny.write_jsonl(d / "test.jsonl", lm_tiny.alpaca_rows(4))

    def prepare(nodes):
        return launch.prepare(argparse.Namespace(
            cmd="sim", nodes=nodes, cpus_per_node=1, gpus_per_node=0,
            work_dir=str(tmp_path / "w"), resume=None, preset=None, overrides=[
                'task="causal-lm"', f'model="{model_dir(root)}"', f'data-dir="{d}"',
                'partitioner="natural"', 'partition-column="user"', f'run-dir="{tmp_path}"',
                "min-available-nodes=2", "min-train-nodes=2"]), light=True)

    prepare(5)
    with pytest.raises(ValueError, match=r"train\.jsonl: partitioner 'natural': 5 distinct "
                                         r"value\(s\) of partition column 'user' in the "
                                         r"training rows for 6 partitions") as err:
        prepare(6)
    assert "\n" not in str(err.value)


def test_flowertune_preset_needs_a_model_folder_and_data(root, alpaca_dir, tmp_path):
    """The FlowerTune general-NLP preset is refused in one line without a model folder and data;
    given them (and quantize off: this machine has no GPU) it passes the launcher's check with
    FlowerTune's r=32, alpha=64 on q_proj/v_proj, 20 clients at 10 %."""
    import argparse

    from fedlora import launch
    from fedlora.presets import FLOWERTUNE_NLP

    def args(*overrides):
        return argparse.Namespace(cmd="sim", nodes=20, cpus_per_node=1, gpus_per_node=0,
                                  work_dir=str(tmp_path / "w"), resume=None,
                                  preset="flowertune-nlp", overrides=list(overrides))

    with pytest.raises(ValueError, match=r"^preset 'flowertune-nlp' needs model \(.*\); "
                                         r"data-dir \(") as err:
        launch.prepare(args(), light=True)
    assert "\n" not in str(err.value)
    ok, _ = launch.prepare(args(f'model="{model_dir(root)}"', f'data-dir="{alpaca_dir}"',
                                'quantize="none"', 'device="cpu"', f'run-dir="{tmp_path}"'),
                           light=True)
    assert (ok["lora-rank"], ok["lora-alpha"], ok["fraction-train"]) == (32, 64.0, 0.1)
    assert ok["lora-targets"] == "q_proj,v_proj"  # peft's default, what the template adapts
    assert FLOWERTUNE_NLP["min-available-nodes"] == 20 and ok["lr-schedule"] == "cosine"
    with pytest.raises(ValueError, match="quantize='4bit' needs a CUDA GPU"):
        launch.prepare(args(f'model="{model_dir(root)}"', f'data-dir="{alpaca_dir}"',
                            f'run-dir="{tmp_path}"'), light=True)
