"""combine and extract on classifier adapters: `lorakit combine --head-from` on two classifier
adapters trained in the test (the head is the chosen input's, the LoRA update the method's
dense float64 reference), and `lorakit extract` of a classifier fine-tuned in the test against
its plain base folder (logits of the tuned model, label names kept)."""

from __future__ import annotations

import copy
import json

import pytest
import tiny
import torch
from test_extract import finetune
from test_train_fixtures import bert_dir, cls_files, train_argv  # noqa: F401

import lorakit
from lorakit import hf
from lorakit.cli import main
from lorakit.commands._common import load_adapted
from lorakit.files.card import read_card

IDS = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(7))


def one_error_line(capsys, code, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"lorakit {command}: error:"), err
    return err[0]


# --- combine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, bert_dir, cls_files):  # noqa: F811
    """Two classifier adapters of one base, trained with different seeds (so different heads)."""
    root = tmp_path_factory.mktemp("classifiers")
    for name, seed in (("a", "1"), ("b", "2")):
        argv = train_argv(bert_dir, cls_files[0], root / name, "--seed", seed, "--lr", "1e-2", max_steps=3)
        assert main(argv) == 0
    return root / "a" / "adapter", root / "b" / "adapter"


def factors(folder):
    """{module: (A, B, scaling)} and {name: full tensor} of an adapter file, read directly."""
    config, tensors, _ = lorakit.read_adapter(folder)
    modules = [k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")]
    pairs = {
        m: (tensors[m + ".lora_A.weight"].double(), tensors[m + ".lora_B.weight"].double(), config.scaling_for(m))
        for m in modules
    }
    full = {k: v for k, v in tensors.items() if "lora_" not in k}
    return pairs, full


def best_rank(delta: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def test_differing_heads_are_refused_with_the_way_out(classifiers, tmp_path, capsys):
    a, b = classifiers
    line = one_error_line(capsys, main(["combine", str(a), str(b), "--out", str(tmp_path / "ab")]), "combine")
    assert "different heads (classifier)" in line and "--head-from" in line
    argv = ["combine", str(a), str(b), "--out", str(tmp_path / "ab"), "--head-from", str(tmp_path)]
    assert "not one of the inputs" in one_error_line(capsys, main(argv), "combine")
    assert not (tmp_path / "ab").exists()


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_head_from_keeps_that_inputs_head_and_the_methods_update(classifiers, tmp_path, capsys, method):
    a, b = classifiers
    out = tmp_path / "ab"
    argv = ["combine", str(a), str(b), "--out", str(out), "--method", method, "--weights", "0.7,0.3"]
    assert main([*argv, "--head-from", str(b)]) == 0
    assert f"head from {b}" in capsys.readouterr().out
    (pa, fa), (pb, fb), (po, fo) = factors(a), factors(b), factors(out)
    assert fo.keys() == fb.keys() and all(torch.equal(fo[k], fb[k]) for k in fb)  # B's head, exactly
    assert any(not torch.equal(fa[k], fb[k]) for k in fa)  # (and the heads did differ)
    assert po.keys() == pa.keys()
    for module, (A, B, s) in po.items():
        A1, B1, s1 = pa[module]
        A2, B2, s2 = pb[module]
        dense = 0.7 * s1 * B1 @ A1 + 0.3 * s2 * B2 @ A2
        want = dense if method == "cat" else best_rank(dense, max(A1.shape[0], A2.shape[0]))
        torch.testing.assert_close(s * B @ A, want, atol=1e-6, rtol=1e-5)
    assert read_card(out).labels == read_card(b).labels and read_card(out).task == "classify"
    model, _, info = load_adapted(None, str(out))  # the base from the card, the head from b
    assert info["labels"] == read_card(b).labels
    torch.testing.assert_close(model.classifier.modules_to_save["default"].weight, fb["classifier.weight"])


# --- extract ------------------------------------------------------------------------------------
LABELS = {0: "neg", 1: "neu", 2: "pos"}


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """(plain base folder: a BertModel, no classifier; the classifier fully fine-tuned from it, its folder)."""
    root = tmp_path_factory.mktemp("extract")
    start = tiny.bert(0)
    start.bert.save_pretrained(root / "base")  # the backbone alone, as a plain base model is shipped
    start.config.id2label, start.config.label2id = LABELS, {v: k for k, v in LABELS.items()}
    tuned = finetune(start, steps=4)
    tuned.save_pretrained(root / "tuned")
    return root / "base", tuned, root / "tuned"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_extract_a_classifier_against_its_plain_base(fine_tuned, tmp_path, capsys):
    base, tuned, tuned_dir = fine_tuned
    assert json.loads((base / "config.json").read_text())["architectures"] == ["BertModel"]
    out = tmp_path / "adapter"
    assert main(["extract", "--base", str(base), "--tuned", str(tuned_dir), "--rank", "64", "--out", str(out)]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert "classifier" in saved["modules_to_save"] and saved["task_type"] == "SEQ_CLS"
    info = hf.adapter_task(out)
    assert info.labels == list(LABELS.values()) and info.num_labels == 3
    config = hf.load_config(base)
    config.num_labels = 3
    torch.manual_seed(123)  # a fresh head unlike the one extract started from: the saved head replaces it
    model = lorakit.load_adapter(hf.load_base(base, hf.CLASSIFY, config).eval(), out)
    torch.testing.assert_close(logits(model), logits(tuned), atol=1e-5, rtol=1e-5)
    loaded, _, got = load_adapted(None, str(out))  # the base comes from the card
    assert got["model"].resolve() == base.resolve() and got["labels"] == list(LABELS.values())
    torch.testing.assert_close(logits(loaded), logits(tuned), atol=1e-5, rtol=1e-5)


def test_low_rank_extract_is_within_the_truncation_error(fine_tuned, tmp_path):
    base, tuned, tuned_dir = fine_tuned
    out, report = tmp_path / "adapter", tmp_path / "report.json"
    argv = ["extract", "--base", base, "--tuned", tuned_dir, "--rank", "2", "--out", out, "--report", report]
    assert main([str(a) for a in argv]) == 0
    model, _, _ = load_adapted(None, str(out))
    tuned_modules = dict(tuned.named_modules())
    for row in json.loads(report.read_text()):
        layer = model.get_submodule(row["name"])
        effective = layer.original_weight().double() + layer.delta_weight("default").double()
        target = tuned_modules[row["name"]].weight.double()
        error = float((effective - target).detach().norm())
        assert error == pytest.approx(row["rel_error"] * row["delta_norm"], rel=1e-4, abs=1e-6)


def test_extract_refuses_a_base_of_another_architecture(fine_tuned, tmp_path, capsys):
    _, _, tuned_dir = fine_tuned
    tiny.gpt2(0).save_pretrained(tmp_path / "gpt")
    argv = ["extract", "--base", str(tmp_path / "gpt"), "--tuned", str(tuned_dir), "--rank", "2", "--out", "x"]
    line = one_error_line(capsys, main(argv), "extract")
    assert "give the same architecture" in line


def test_a_tuned_classifier_with_its_own_head_base_still_extracts(fine_tuned, tmp_path):
    """The old path (base and tuned of one class) is unchanged."""
    _, tuned, tuned_dir = fine_tuned
    start = copy.deepcopy(tuned)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.01 * torch.randn_like(p))
    start.save_pretrained(tmp_path / "base")
    argv = ["extract", "--base", tmp_path / "base", "--tuned", tuned_dir, "--rank", "64", "--out", tmp_path / "a"]
    assert main([str(a) for a in argv]) == 0
    model = lorakit.load_adapter(copy.deepcopy(start), tmp_path / "a")
    torch.testing.assert_close(logits(model), logits(tuned), atol=1e-5, rtol=1e-5)
