"""The shipped chat adapter (src/lorakit/models/sst2-gpt-adapters/chat, built by
tools/train_chat_adapter.py): a PEFT-format file with its chat template, better than the base
on held-out conversations from real text, and served by `lorakit serve` with no arguments as
model "chat" with the answer plain transformers generation gives."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import lorakit
from lorakit import defaults, hf
from lorakit.commands import serve
from lorakit.train import chat
from lorakit.train.evaluate import evaluate
from lorakit.train.prepare import chat_dataset

CHAT = defaults.default_chat_adapter() if defaults.default_chat_adapter().is_dir() else None
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
REQUEST = "write the opening of a positive movie review ."
pytestmark = pytest.mark.skipif(CHAT is None, reason="the chat adapter is not shipped in this checkout")


@pytest.fixture(scope="module")
def tokenizer():
    return hf.load_tokenizer(defaults.default_causal_lm_path())


def _model():
    return lorakit.load_adapter(hf.load_base(defaults.default_causal_lm_path(), hf.CAUSAL_LM), CHAT).eval()


def test_the_adapter_folder_carries_its_template_and_card():
    template = chat.read_template(CHAT)
    assert template is not None and "generation" in template
    card = hf.adapter_task(CHAT)
    assert card.task == hf.CAUSAL_LM


@pytest.mark.realtext
@pytest.mark.skipif(not (SST2 / "dev.tsv").is_file(), reason="needs ../shared/data/sst2/dev.tsv")
def test_beats_the_base_on_held_out_conversations(tmp_path, tokenizer):
    """Conversations built here from dev.tsv sentences (never trained on): the assistant-turn
    loss with the adapter is below the base's by a clear margin."""
    rows = [line.rstrip("\n").rsplit("\t", 1) for line in (SST2 / "dev.tsv").read_text().splitlines()[1:]]
    rng = random.Random(3)
    lines = []
    for text, label in rng.sample(rows, 80):
        side = "positive" if label == "1" else "negative"
        ask = {"role": "user", "content": f"write the opening of a {side} movie review ."}
        answer = {"role": "assistant", "content": " ".join(text.split()[:12])}
        lines.append(json.dumps({"messages": [ask, answer]}))
    (tmp_path / "dev.jsonl").write_text("\n".join(lines) + "\n")
    data = chat_dataset(tmp_path / "dev.jsonl", tokenizer, chat.read_template(CHAT), max_length=128)
    model = _model()
    with lorakit.disable_adapters(model):
        base = evaluate(model, tokenizer, data)["loss"]
    adapted = evaluate(model, tokenizer, data)["loss"]
    assert adapted < base - 0.5, (base, adapted)


def test_served_by_default_as_chat_with_the_answer_transformers_generates(tokenizer):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    app, _, names = serve.build_app(parser.parse_args([]))
    assert "chat" in names
    messages = [{"role": "user", "content": REQUEST}]
    with TestClient(app) as http:
        body = {"model": "chat", "messages": messages, "max_tokens": 12, "temperature": 0}
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    served = response.json()["choices"][0]["message"]["content"]
    prompt = chat.render_prompt(tokenizer, messages, chat.read_template(CHAT))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = _model().generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert served.strip() == expected.strip() and served.strip()
