"""Chat fine-tuning through `lorakit train --task causal-lm` with the shipped GPT: conversations
train on the assistant's turns (checked against the rendered text, not only against
chat.encode_conversation), the template is saved with the adapter, --train-on-prompt, truncation
counts, --packing end to end, and `--text-column messages` refused."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.hf import model_path
from lorakit.train import TrainConfig, chat
from lorakit.train.data import IGNORE_INDEX
from lorakit.train.model import load_tokenizer
from lorakit.train.prepare import build_datasets

CONVERSATIONS = [
    [
        {"role": "system", "content": "You rate film reviews."},
        {"role": "user", "content": f"Review {i}: {'a warm, funny film' if i % 2 else 'dull and far too long'}"},
        {"role": "assistant", "content": "positive" if i % 2 else "negative"},
        {"role": "user", "content": "Why?"},
        {
            "role": "assistant",
            "content": "the review says so " * (1 + i % 3) + ("at great length " * 12 if i % 5 == 0 else ""),
        },
    ]
    for i in range(24)
]


@pytest.fixture(scope="module")
def gpt():
    path = model_path(None, "causal-lm")
    return path, load_tokenizer(path)


@pytest.fixture
def chat_file(tmp_path):
    file = tmp_path / "chat.jsonl"
    file.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS), encoding="utf-8")
    return file


def train(tmp_path, chat_file, *extra):
    out = tmp_path / "run"
    argv = ["train", "--task", "causal-lm", "--train", str(chat_file), "--out", str(out)]
    argv += ["--max-steps", "2", "--batch-size", "8", "--no-progress", *extra]
    assert main(argv) == 0
    return out, json.loads((out / "summary.json").read_text())


def dataset(chat_file, **settings):
    config = TrainConfig(train=str(chat_file), out="unused", task="causal-lm", max_length=128, **settings)
    tokenizer = load_tokenizer(model_path(None, "causal-lm"))
    return build_datasets(config, tokenizer)[0], tokenizer


def test_chat_run_saves_the_template_and_trains_on_the_assistant_only(tmp_path, chat_file, gpt):
    out, summary = train(tmp_path, chat_file)
    assert (out / "adapter" / chat.TEMPLATE_FILE).read_text() == chat.DEFAULT_CHAT_TEMPLATE  # the GPT has none
    assert chat.read_template(out / "adapter") == chat.template_for(gpt[1])
    assert summary["train_examples"] == len(CONVERSATIONS) and summary["max_length"] == 128  # its context
    data, tokenizer = dataset(chat_file)
    assert data.chat_template == chat.DEFAULT_CHAT_TEMPLATE
    for example, messages in zip(data.examples, CONVERSATIONS, strict=True):
        reference = chat.encode_conversation(tokenizer, messages, chat.DEFAULT_CHAT_TEMPLATE, 128)
        assert (example.input_ids, example.label) == (reference.input_ids, reference.labels)
        # Independent of the mask code: the labelled tokens spell the assistant turns, each with eos.
        learned = tokenizer.decode([t for t in example.label if t != IGNORE_INDEX])
        answers = [m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"]
        assert learned.replace(" ", "") == "".join(answers).replace(" ", "")
        assert tokenizer.decode(example.input_ids).startswith("<|system|>")


def test_every_best_adapter_keeps_its_template(tmp_path, chat_file):
    # the best adapter is replaced at each better evaluation: the template must not block that
    out, summary = train(tmp_path, chat_file, "--eval-split", "0.25", "--eval-every", "1", "--max-steps", "3")
    assert summary["best_step"] == 3 and summary["best_eval"]["loss"] < summary["final_eval"]["loss"] + 1e-9
    assert chat.read_template(out / "adapter") == chat.DEFAULT_CHAT_TEMPLATE
    assert summary["train_examples"] == len(CONVERSATIONS) - round(len(CONVERSATIONS) * 0.25)


def test_train_on_prompt_puts_the_loss_on_every_token(chat_file):
    plain, _ = dataset(chat_file)
    full, _ = dataset(chat_file, train_on_prompt=True)
    for a, b in zip(plain.examples, full.examples, strict=True):
        assert a.input_ids == b.input_ids and b.label == b.input_ids and a.label != b.label


def test_truncated_examples_are_counted_in_the_summary(tmp_path, chat_file, gpt, capsys):
    _, tokenizer = gpt
    lengths = [
        len(tokenizer.apply_chat_template(m, chat_template=chat.DEFAULT_CHAT_TEMPLATE, tokenize=True)["input_ids"])
        for m in CONVERSATIONS
    ]
    limit = sorted(lengths)[len(lengths) // 2]
    expected = sum(n > limit for n in lengths)
    assert 0 < expected < len(lengths)
    _, summary = train(tmp_path, chat_file, "--max-length", str(limit))
    assert summary["truncated_examples"] == expected and summary["max_length"] == limit
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["truncated_examples"] == expected


def test_packing_runs_end_to_end_in_fewer_rows(tmp_path):
    short = tmp_path / "short.jsonl"
    turns = [m[1:3] for m in CONVERSATIONS]  # one question, one answer: ~20 tokens each
    short.write_text("".join(json.dumps({"messages": t}) + "\n" for t in turns), encoding="utf-8")
    _, summary = train(tmp_path, short, "--packing", "--max-length", "128")
    assert summary["steps"] == 2 and 0 < summary["packed_rows"] < summary["train_examples"] // 3
    assert summary["truncated_examples"] == 0


def test_a_text_column_holding_conversations_is_refused(tmp_path, chat_file, capsys):
    argv = ["train", "--task", "causal-lm", "--train", str(chat_file), "--out", str(tmp_path / "r")]
    assert main([*argv, "--text-column", "messages", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--text-column messages holds a list" in err[0] and "'messages' (OpenAI)" in err[0]
    assert not (tmp_path / "r").exists()


def test_sharegpt_records_train_too(tmp_path, gpt):
    file = tmp_path / "share.jsonl"
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    rows = [{"conversations": [{"from": roles[t["role"]], "value": t["content"]} for t in m]} for m in CONVERSATIONS]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    share, _ = dataset(file)
    openai_file = tmp_path / "openai.jsonl"
    openai_file.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS), encoding="utf-8")
    openai, _ = dataset(openai_file)
    assert [e.label for e in share.examples] == [e.label for e in openai.examples]


def test_text_and_prompt_completion_truncation_is_counted(gpt):
    from lorakit.train.data import CausalLMData

    _, tokenizer = gpt
    texts = ["short one", "a much longer text " * 10, "mid length text here " * 3]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    limit = sorted(lengths)[1]
    data = CausalLMData.from_rows([{"text": t} for t in texts], tokenizer, max_length=limit)
    assert data.truncated == sum(n > limit for n in lengths) == 1
    assert max(len(e.input_ids) for e in data.examples) == limit
    rows = [{"prompt": t, "completion": "ok"} for t in texts]
    pairs = CausalLMData.from_rows(
        rows, tokenizer, prompt_column="prompt", completion_column="completion", max_length=limit
    )
    ok = len(tokenizer("ok", add_special_tokens=False)["input_ids"])
    assert pairs.truncated == sum(n + ok + 1 > limit for n in lengths)  # + eos
