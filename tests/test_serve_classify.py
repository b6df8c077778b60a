"""Classifier adapters served as trained: `lorakit serve --model BASE --adapter NAME=DIR` with
adapters from `lorakit train --task classify`, each answering with its own head and label names.

The reference for an adapter is that adapter alone: a fresh base with `load_adapter` (the
library's loader, no mixed-batch hooks), its softmax, and the label names its card gives.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import tiny
import torch
from fastapi.testclient import TestClient
from test_engine import make_tokenizer

import lorakit
from lorakit import LoraConfig, inject
from lorakit.cli import main
from lorakit.commands import serve
from lorakit.files.peft_format import load_adapter, save_adapter
from lorakit.train.model import write_card

LABELS = {"topics": ["food", "money", "sports"], "moods": ["sad", "calm", "happy"]}
TEXTS = ["a good movie", "a bad film with a slow plot", "the cat sat on the mat"]


def make_classifier(folder, labels: list[str], seed: int, modules_to_save=("classifier",), targets="all-linear"):
    """A classify adapter as `lorakit train` saves one: LoRA on every linear layer (`targets`),
    the head trained in full (modules_to_save), the card with the label names."""
    model = tiny.bert(0)
    model.classifier = torch.nn.Linear(model.config.hidden_size, len(labels))
    lora = inject(model, LoraConfig(r=4, alpha=8, target_modules=targets, modules_to_save=list(modules_to_save)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name or any(m in name for m in modules_to_save):
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    save_adapter(lora, folder)
    write_card(folder, "classify", labels, "tiny-bert")
    return folder


def alone(folder, texts: list[str]) -> torch.Tensor:
    """The adapter's probabilities on a fresh base, loaded by the library alone."""
    base = tiny.bert(0)
    num_labels = len(json.loads((folder / "README.md").read_text().split("lorakit: ")[1].split("\n")[0])["labels"])
    base.classifier = torch.nn.Linear(base.config.hidden_size, num_labels)
    model = load_adapter(base, folder).eval()
    with torch.no_grad():
        return model(**make_tokenizer()(texts, padding=True, return_tensors="pt")).logits.softmax(-1)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-classify") / "tiny-bert"
    tiny.bert(0).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def build(model_dir, adapters: dict) -> tuple:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    flags = [f"--adapter={name}={path}" for name, path in adapters.items()]
    flags += [] if model_dir is None else ["--model", str(model_dir)]
    return serve.build_app(parser.parse_args(flags))


def test_two_classifiers_answer_with_their_own_heads_and_label_names(bert_dir, tmp_path):
    folders = {
        name: make_classifier(tmp_path / name, labels, seed) for seed, (name, labels) in enumerate(LABELS.items())
    }
    app, _, names = build(bert_dir, folders)
    assert names == ["moods", "topics"]
    with TestClient(app) as http:
        answers = {n: http.post("/v1/classify", json={"model": n, "input": TEXTS}).json()["data"] for n in folders}
    for name, rows in answers.items():
        expected = alone(folders[name], TEXTS)
        for row, probs in zip(rows, expected, strict=True):
            assert list(row["probabilities"]) == LABELS[name]
            assert list(row["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-5)
            assert row["label"] == LABELS[name][int(probs.argmax())]


def test_a_mixed_classify_batch_keeps_each_rows_own_head(bert_dir, tmp_path):
    folders = {
        name: make_classifier(tmp_path / name, labels, seed) for seed, (name, labels) in enumerate(LABELS.items())
    }
    app, _, _ = build(bert_dir, folders)
    service = app.state.service
    rows = ["topics", "moods", "moods", "topics"]
    texts = [TEXTS[0], TEXTS[0], TEXTS[1], TEXTS[2]]
    batch = service.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad(), service.multi.use(rows):
        probs = service.multi.model(**batch).logits.softmax(-1)
    for i, (adapter, text) in enumerate(zip(rows, texts, strict=True)):
        assert probs[i].tolist() == pytest.approx(alone(folders[adapter], [text])[0].tolist(), abs=1e-5), i
        assert list(service.label_names(adapter, probs.shape[-1]).values()) == LABELS[adapter]
    assert not torch.allclose(probs[0], probs[1], atol=1e-3)  # the same text, two heads


def test_classifiers_with_different_label_counts_are_one_clear_line(bert_dir, tmp_path, capsys):
    three = make_classifier(tmp_path / "three", LABELS["topics"], 1)
    two = make_classifier(tmp_path / "two", ["no", "yes"], 2)
    code = main(["serve", "--model", str(bert_dir), "--adapter", f"three={three}", "--adapter", f"two={two}"])
    err = capsys.readouterr().err
    assert code == 2 and "different numbers of labels (three: 3, two: 2)" in err and "Traceback" not in err


def test_a_classifier_trained_by_lorakit_on_the_packaged_minilm_serves_as_trained(tmp_path):
    """The reported failure: `lorakit train --task classify` on the default base, then serve it."""
    from lorakit import defaults
    from lorakit.commands._common import load_adapted

    data = tmp_path / "train.jsonl"
    lines = (Path(lorakit.__file__).parent / "data" / "demo" / "train.jsonl").read_text().splitlines()[:24]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    flags = ["--task", "classify", "--train", str(data), "--out", str(out), "--max-steps", "2", "--no-progress"]
    assert main(["train", *flags]) == 0
    labels = sorted({json.loads(line)["label"] for line in lines})
    app, _, _ = build(defaults.default_model_path(), {"reviews": out / "adapter"})
    texts = ["We split the rent three ways.", "The lake froze over."]
    with TestClient(app) as http:
        rows = http.post("/v1/classify", json={"model": "reviews", "input": texts}).json()["data"]
    app, base, _ = build(None, {"reviews": out / "adapter"})  # a classifier adapter: MiniLM is the default base
    with TestClient(app) as http:
        assert http.post("/v1/classify", json={"model": "reviews", "input": texts}).json()["data"] == rows
    assert base == defaults.default_model_path().name
    model, tokenizer, info = load_adapted(str(defaults.default_model_path()), str(out / "adapter"))
    with torch.no_grad():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert info["labels"] == labels
    for row, probs in zip(rows, expected, strict=True):
        assert list(row["probabilities"]) == labels
        assert list(row["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-5)


def test_loading_a_classifier_of_another_label_count_later_says_so_in_labels(bert_dir, tmp_path):
    from lorakit.files.peft_format import AdapterError

    app, _, _ = build(bert_dir, {"topics": make_classifier(tmp_path / "topics", LABELS["topics"], 1)})
    two = make_classifier(tmp_path / "two", ["no", "yes"], 2)
    with pytest.raises(AdapterError, match="is a classifier of 2 labels and this server's has 3") as err:
        app.state.service.registry.register("two", two, trusted=True)
    assert "shape" not in str(err.value)


def test_a_saved_pooler_is_used_per_row_next_to_an_adapter_with_lora_on_it(bert_dir, tmp_path):
    """One adapter trains BERT's pooler in full (modules_to_save), the other puts LoRA on the
    pooler's dense layer: in one batch, each row is its adapter alone."""
    saved = make_classifier(tmp_path / "saved", LABELS["topics"], 1, ("classifier", "pooler"), ["query", "value"])
    lora = make_classifier(tmp_path / "lora", LABELS["moods"], 2)
    app, _, _ = build(bert_dir, {"saved": saved, "lora": lora})
    service = app.state.service
    batch = service.tokenizer([TEXTS[1]] * 3, padding=True, return_tensors="pt")
    with torch.no_grad(), service.multi.use(["saved", "lora", "saved"]):
        probs = service.multi.model(**batch).logits.softmax(-1)
    for i, folder in enumerate((saved, lora, saved)):
        assert probs[i].tolist() == pytest.approx(alone(folder, [TEXTS[1]])[0].tolist(), abs=1e-5), i


def test_label_names_of_an_adapter_removed_meanwhile_fall_back_to_the_base(bert_dir, tmp_path):
    app, _, _ = build(bert_dir, {"topics": make_classifier(tmp_path / "topics", LABELS["topics"], 1)})
    service = app.state.service
    assert list(service.label_names("topics", 3).values()) == LABELS["topics"]
    assert service.label_names("topics", 2) == service.multi.model.config.id2label  # not its head's size
    service.registry.remove("topics")
    assert service.label_names("topics", 3) == service.multi.model.config.id2label
