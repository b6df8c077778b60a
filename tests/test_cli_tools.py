"""`lorakit merge / inspect / predict / generate` on tiny models saved to disk, checked against PEFT.

References are independent of lorakit: PEFT loading the same adapter files, plain transformers
loading the merged folder, the safetensors file read directly, a hand-written greedy loop.
"""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from peft import PeftModel
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

import lorakit
from lorakit.cli import main

WORDS = [f"w{i}" for i in range(86)] + "the a good bad movie film was is not very".split()
LABELS = ["negative", "neutral", "positive"]  # tiny.bert has 3 labels


def tokenizer() -> PreTrainedTokenizerFast:
    """A 100-token word-level tokenizer, so the tiny models (vocab 100) get real text."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _randomise_lora(model: torch.nn.Module) -> None:
    # B starts at zero; random B (and head) make the adapter change the outputs, so checks can fail.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                param.normal_(0, 0.5)


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
    """(base folder, adapter folder, other base folder) for a tiny BERT classifier."""
    root = tmp_path_factory.mktemp("bert")
    base = tiny.bert(0)
    base.save_pretrained(root / "base")
    tokenizer().save_pretrained(root / "base")
    tiny.bert(1).save_pretrained(root / "other")
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"], rank_pattern={r"layer\.1\..*": 2})
    lorakit.inject(base, config)
    _randomise_lora(base)
    adapter = lorakit.save_adapter(base, root / "run" / "adapter")
    from lorakit.train.model import write_card

    write_card(adapter, "classify", LABELS, str(root / "base"))
    return root / "base", adapter, root / "other"


@pytest.fixture(scope="module")
def gpt_files(tmp_path_factory):
    """(base folder, adapter folder) for a tiny GPT-2."""
    root = tmp_path_factory.mktemp("gpt")
    base = tiny.gpt2(0)
    base.save_pretrained(root / "base")
    tok = tokenizer()
    tok.eos_token = "[SEP]"
    tok.save_pretrained(root / "base")
    lorakit.inject(base, lorakit.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]))
    _randomise_lora(base)
    return root / "base", lorakit.save_adapter(base, root / "adapter")


def peft_classifier(base, adapter) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    return PeftModel.from_pretrained(model, adapter).eval()


def call(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, command: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorakit {command}: error: "), err
    assert "Traceback" not in err


TEXTS = ["the movie was very good", "a bad film", "w1 w2 w3 not good"]


# --- merge -------------------------------------------------------------------------------------
def test_merge_writes_a_folder_plain_transformers_loads_with_peft_outputs(bert_files, tmp_path, capsys):
    base, adapter, _ = bert_files
    code, out, _ = call(capsys, "merge", "--model", base, "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 0 and "max |diff|" in out
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    reference = peft_classifier(base, adapter)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "merged")  # the tokenizer was copied
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want, got = reference(**batch).logits, merged(**batch).logits
    assert (want - got).abs().max().item() < 1e-5
    with torch.inference_mode():  # the adapter matters: the base alone gives other logits
        assert (AutoModelForSequenceClassification.from_pretrained(base)(**batch).logits - want).abs().max() > 1e-2
    assert merged.config.id2label == dict(enumerate(LABELS))
    assert not any("lora" in k for k in merged.state_dict())


def test_merge_of_a_causal_lm_with_conv1d_layers_matches_peft(gpt_files, tmp_path, capsys):
    base, adapter = gpt_files
    code, _, err = call(capsys, "merge", "--model", base, "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 0 and err == ""
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids = tokenizer()(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert (merged(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item() < 1e-5


def test_merge_refuses_a_non_empty_folder_and_overwrites_only_when_asked(bert_files, tmp_path, capsys):
    base, adapter, _ = bert_files
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = call(capsys, "merge", "--model", base, "--adapter", adapter, "--out", out)
    assert code == 2 and "--overwrite" in err
    one_line_error(err, "merge")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, _ = call(capsys, "merge", "--model", base, "--adapter", adapter, "--out", out, "--overwrite")
    assert code == 0 and (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left behind


def test_merge_refuses_a_written_folder_whose_outputs_differ(bert_files, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    from lorakit.commands import merge

    base, adapter, _ = bert_files
    real = merge._write_merged

    def faulty_writer(folder, plain, tok):  # a writer bug: the head on disk is off by 1e-2
        real(folder, plain, tok)
        tensors = load_file(folder / "model.safetensors")
        key = next(k for k in tensors if k.endswith("classifier.weight"))
        tensors[key] = tensors[key] + 1e-2
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(merge, "_write_merged", faulty_writer)
    for out in (tmp_path / "new", tmp_path / "old"):
        if out.name == "old":  # an existing folder is replaced only by a checked one
            (out).mkdir()
            (out / "keep.txt").write_text("mine")
        code, _, err = call(capsys, "merge", "--model", base, "--adapter", adapter, "--out", out, "--overwrite")
        assert code == 2 and "differ from base + adapter" in err and "limit 1.0e-04" in err
        one_line_error(err, "merge")
    assert not (tmp_path / "new").exists() and names(tmp_path / "old") == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temp folder left either
    monkeypatch.undo()
    code, out, _ = call(capsys, "merge", "--model", base, "--adapter", adapter, "--out", tmp_path / "new")
    assert code == 0 and "reloaded with transformers" in out and "(limit 1.0e-04)" in out


def names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("case", ["other base", "not an adapter", "no model folder", "missing option"])
def test_merge_bad_input_is_one_line_and_writes_nothing(bert_files, tmp_path, capsys, case):
    base, adapter, other = bert_files
    argv = {
        "other base": ["--model", other, "--adapter", adapter],
        "not an adapter": ["--model", base, "--adapter", base],
        "no model folder": ["--model", tmp_path / "nope", "--adapter", adapter],
        "missing option": ["--model", base],
    }[case]
    code, _, err = call(capsys, "merge", *argv, "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, "merge")
    expected = {
        "other base": "different base",
        "not an adapter": "adapter_config.json",
        "no model folder": "no such folder",
        "missing option": "--adapter",
    }
    assert expected[case] in err
    assert not (tmp_path / "out").exists()


# --- inspect -----------------------------------------------------------------------------------
def test_inspect_reports_ranks_params_size_and_peft_loadability(bert_files, capsys):
    _, adapter, _ = bert_files
    code, out, _ = call(capsys, "inspect", adapter, "--json")
    assert code == 0
    report = json.loads(out)
    weights = adapter / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
        fingerprint = handle.metadata()["lorakit_base_fingerprint"]
    ranks = {t["module"]: t["rank"] for t in report["targets"]}
    assert ranks == {
        f"bert.encoder.layer.{i}.attention.self.{m}": (4 if i == 0 else 2) for i in (0, 1) for m in ("query", "value")
    }
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert report["params"]["total"] == total
    assert report["params"]["saved_modules"] == sum(
        torch.Size(s).numel() for k, s in shapes.items() if k.startswith("base_model.model.classifier.")
    )
    assert report["weights_bytes"] == weights.stat().st_size
    assert report["base_fingerprint"] == fingerprint
    assert report["peft"]["loadable"] and report["task_type"] == "SEQ_CLS"
    code, text, _ = call(capsys, "inspect", adapter)
    assert code == 0 and "PEFT loadable  yes" in text and "r=2" in text and "r=4" in text


def test_inspect_reads_an_adapter_peft_wrote(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny.bert(0), LoraConfig(r=3, lora_alpha=6, target_modules=["key"], task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "peft")
    code, out, _ = call(capsys, "inspect", tmp_path / "peft", "--json")
    report = json.loads(out)
    assert code == 0 and report["base_fingerprint"] is None and report["peft"]["loadable"]
    assert {t["module"]: t["rank"] for t in report["targets"]} == {
        f"bert.encoder.layer.{i}.attention.self.key": 3 for i in (0, 1)
    }
    assert report["params"]["lora"] == 2 * (3 * 32 + 32 * 3)


def test_inspect_flags_what_peft_cannot_load(bert_files, tmp_path, capsys):
    _, adapter, _ = bert_files
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = "sixteen"  # PEFT's LoraConfig takes it, lorakit's validation does not
    (bad / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = call(capsys, "inspect", bad)
    assert code == 2 and "alpha" in err
    one_line_error(err, "inspect")
    code, _, err = call(capsys, "inspect", tmp_path / "missing")
    assert code == 2 and "no such adapter folder" in err


def test_inspect_peft_check_uses_peft(bert_files, tmp_path):
    from lorakit.commands.inspect import peft_check

    _, adapter, _ = bert_files
    raw = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_check(adapter, raw, {"x.lora_A.weight": 0}) == {
        "loadable": True,
        "checked_with": f"peft {__import__('peft').__version__}",
        "problems": [],
    }
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({**raw, "r": "x"}))  # only PEFT itself sees this
    result = peft_check(broken, raw, {"x.lora_A.weight": 0})
    assert not result["loadable"] and result["problems"][0].startswith("peft.LoraConfig.from_pretrained fails")
    result = peft_check(adapter, {**raw, "peft_type": "IA3"}, {"x.weight": 0})
    assert not result["loadable"] and any("no lora_A" in p for p in result["problems"])


# --- predict -----------------------------------------------------------------------------------
def test_predict_probabilities_match_peft_and_the_merged_folder(bert_files, tmp_path, capsys):
    base, adapter, _ = bert_files
    argv = ["predict", "--model", base, "--adapter", adapter, "--json"]
    code, out, _ = call(capsys, *argv, *(a for t in TEXTS for a in ("--text", t)))
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    reference = peft_classifier(base, adapter)
    batch = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = reference(**batch).logits.softmax(-1)
    got = torch.tensor([[r["probabilities"][name] for name in LABELS] for r in rows])
    assert (got - want).abs().max().item() < 1e-5
    assert [r["label"] for r in rows] == [LABELS[i] for i in want.argmax(-1)]
    assert [r["text"] for r in rows] == TEXTS
    # the merged folder alone predicts the same, with the label names carried in its config
    call(capsys, "merge", "--model", base, "--adapter", adapter, "--out", tmp_path / "merged")
    code, out2, _ = call(
        capsys, "predict", "--model", tmp_path / "merged", "--json", *(a for t in TEXTS for a in ("--text", t))
    )
    merged = torch.tensor([[json.loads(x)["probabilities"][n] for n in LABELS] for x in out2.splitlines()])
    assert code == 0 and (merged - want).abs().max().item() < 1e-5


def test_predict_reads_data_files_like_train(bert_files, tmp_path, capsys):
    base, adapter, _ = bert_files
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t0\n" for t in TEXTS))
    code, out, _ = call(capsys, "predict", "--model", base, "--adapter", adapter, "--data", data)
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == TEXTS
    assert all(line.split("\t")[0] in LABELS and 0 < float(line.split("\t")[1]) <= 1 for line in lines)


@pytest.mark.parametrize("case", ["missing", "empty", "not utf-8", "unknown column", "no input", "causal adapter"])
def test_predict_bad_input_is_one_line(bert_files, gpt_files, tmp_path, capsys, case):
    base, adapter, _ = bert_files
    data = tmp_path / "d.jsonl"
    if case == "empty":
        data.write_text("")
    elif case == "not utf-8":
        data.write_bytes(b'{"text": "caf\xe9"}\n')
    elif case == "unknown column":
        data.write_text('{"review": "good"}\n')
    argv = ["predict", "--model", base, "--adapter", adapter, "--data", data]
    if case == "no input":
        argv = argv[:-2]
    if case == "causal adapter":
        argv = ["predict", "--model", gpt_files[0], "--adapter", gpt_files[1], "--text", "good"]
    code, out, err = call(capsys, *argv)
    assert code == 2 and out == ""
    one_line_error(err, "predict")
    expected = {
        "missing": "does not exist",
        "empty": "empty",
        "not utf-8": "UTF-8",
        "unknown column": "columns are: review",
        "no input": "--text",
        "causal adapter": "causal-lm",
    }
    assert expected[case] in err


# --- generate ----------------------------------------------------------------------------------
def test_generate_greedy_matches_a_hand_written_loop_on_peft(gpt_files, capsys):
    base, adapter = gpt_files
    prompt = "the movie was"
    code, out, _ = call(
        capsys, "generate", "--model", base, "--adapter", adapter, "--prompt", prompt, "--max-new-tokens", 8, "--json"
    )
    assert code == 0
    got = json.loads(out)["completion"]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    tok = tokenizer()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        for _ in range(8):
            ids = torch.cat([ids, reference(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if ids[0, -1].item() == tok.convert_tokens_to_ids("[SEP]"):
                break
    want = tok.decode(ids[0, 3:], skip_special_tokens=True)
    assert got == want
    code, plain, _ = call(capsys, "generate", "--model", base, "--prompt", prompt, "--max-new-tokens", 8, "--json")
    assert code == 0 and json.loads(plain)["completion"] != got  # the adapter changes the text


def test_generate_sampling_is_seeded(gpt_files, capsys):
    base, adapter = gpt_files
    argv = [
        "generate",
        "--model",
        base,
        "--adapter",
        adapter,
        "--prompt",
        "a",
        "--temperature",
        "1.5",
        "--top-p",
        "0.9",
    ]
    texts = [call(capsys, *argv, "--seed", seed)[1] for seed in (1, 1, 2)]
    assert texts[0] == texts[1] and texts[0] != texts[2]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--max-new-tokens", "500"], "positions"),
    ],
)
def test_generate_bad_options_are_one_line(gpt_files, capsys, extra, expected):
    base, adapter = gpt_files
    code, _, err = call(capsys, "generate", "--model", base, "--adapter", adapter, "--prompt", "a", *extra)
    assert code == 2 and expected in err
    one_line_error(err, "generate")


def test_generate_refuses_a_classification_adapter(bert_files, gpt_files, capsys):
    code, _, err = call(capsys, "generate", "--model", gpt_files[0], "--adapter", bert_files[1], "--prompt", "a")
    assert code == 2 and "classify adapter" in err
    one_line_error(err, "generate")


def test_generate_defaults_to_the_shipped_gpt_and_its_adapters_change_the_text(capsys):
    from lorakit import defaults

    try:
        defaults.default_causal_lm_path()
    except FileNotFoundError:
        pytest.skip("the shipped SST-2 GPT is not built")
    adapters = defaults.default_causal_lm_adapters()
    argv = ["generate", "--prompt", "the movie was", "--max-new-tokens", "12", "--json"]
    texts = [call(capsys, *argv, *extra) for extra in ([], ["--adapter", adapters["positive"]])]
    assert [code for code, _, _ in texts] == [0, 0]
    plain, positive = (json.loads(out)["completion"] for _, out, _ in texts)
    assert plain and plain != positive
