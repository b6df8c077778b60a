"""The shipped causal-LM default (a small GPT-2 trained on SST-2 text) and its two shipped adapters.

Reads only the files in src/lorakit/models/ (and, for the `realtext` test, ../shared/data/sst2/).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

import lorakit
from lorakit.defaults import default_causal_lm_adapters, default_causal_lm_path, offline

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
SIDES = {"positive": 1, "negative": 0}
# Built-in review sentences in SST-2's style (lower case, spaced punctuation); not from the data set.
SENTENCES = [
    "the film is a charming and funny story about a family .",
    "it 's one of the worst movies of the year .",
    "the performances are strong , but the script is weak .",
    "a beautifully acted and moving drama .",
]


@pytest.fixture(scope="module")
def tokenizer():
    offline()
    return AutoTokenizer.from_pretrained(default_causal_lm_path())


def _base() -> GPT2LMHeadModel:
    offline()
    return AutoModelForCausalLM.from_pretrained(default_causal_lm_path()).eval()


@pytest.fixture(scope="module")
def base() -> GPT2LMHeadModel:
    return _base()


def _nll(model, tokenizer, texts: list[str]) -> tuple[float, int]:
    """Summed next-token NLL (eos included) and the number of predicted tokens, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total, count


def _ppl(model, tokenizer, texts: list[str]) -> float:
    total, count = _nll(model, tokenizer, texts)
    return float(torch.tensor(total / count).exp())


def test_model_and_tokenizer_load_offline_with_plain_transformers(monkeypatch, base, tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = default_causal_lm_path()
    assert isinstance(base, GPT2LMHeadModel)
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    assert base.lm_head.weight.data_ptr() == base.transformer.wte.weight.data_ptr()  # tied, saved once
    assert 2e6 < sum(p.numel() for p in base.parameters()) < 8e6
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == eot
    assert base.config.eos_token_id == base.generation_config.eos_token_id == eot
    ids = tokenizer("the movie is")["input_ids"]
    assert ids[0] == eot and eot not in ids[1:]  # every text starts as training rows did
    odd = "café — naïve 😀 \t tabs"
    assert tokenizer.decode(tokenizer(odd)["input_ids"], skip_special_tokens=True) == odd  # byte-level: lossless
    assert 4000 <= len(tokenizer) <= 8192 and base.config.vocab_size == len(tokenizer)


def test_model_learned_sst2_text(base, tokenizer):
    """Real sentences are far likelier than the same words shuffled, and far below a uniform guess."""
    rng = random.Random(0)
    shuffled = []
    for text in SENTENCES:
        words = text.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    real = _ppl(base, tokenizer, SENTENCES)
    assert real < len(tokenizer) / 10
    assert real * 3 < _ppl(base, tokenizer, shuffled)


def test_adapters_are_small_peft_lora_files():
    folders = default_causal_lm_adapters()
    assert set(folders) == set(SIDES)
    for folder in folders.values():
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 8 and config["task_type"] == "CAUSAL_LM"
        assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
        _, tensors, _ = lorakit.read_adapter(folder)
        assert len(tensors) == 4 * 4 * 2  # 4 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B)
        assert (folder / "adapter_model.safetensors").stat().st_size < 1_000_000


@pytest.mark.parametrize("side", list(SIDES))
def test_adapter_same_logits_in_lorakit_and_peft(side, base, tokenizer):
    from peft import PeftModel

    folder = default_causal_lm_adapters()[side]
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = base(**batch).logits
        ours = lorakit.load_adapter(_base(), folder).eval()(**batch).logits
        theirs = PeftModel.from_pretrained(_base(), folder).eval()(**batch).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - plain).abs().max().item() > 1e-2  # the adapter really changes the model


def test_adapters_generate_differently(tokenizer):
    model = _base()
    for side, folder in default_causal_lm_adapters().items():
        lorakit.load_adapter(model, folder, adapter_name=side)
    prompt = tokenizer("the movie is", return_tensors="pt")
    texts = {}
    for side in SIDES:
        lorakit.set_adapter(model, side)
        out = model.generate(**prompt, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        texts[side] = tokenizer.decode(out[0], skip_special_tokens=True)
    assert all(t.startswith("the movie is") for t in texts.values())
    assert texts["positive"] != texts["negative"]


@pytest.mark.realtext
@pytest.mark.skipif(not (SST2 / "dev.tsv").is_file(), reason="needs ../shared/data/sst2/dev.tsv")
def test_each_adapter_is_best_on_its_own_side_of_real_dev_text(tokenizer):
    """On held-out SST-2 sentences each adapter beats the other on its own side, and comparing the two
    adapters' likelihoods classifies sentiment well above chance (a label is at most 1 bit per sentence,
    so a few percent of perplexity is all the sentiment an LM adapter can gain)."""
    rows = [line.rstrip("\n").rsplit("\t", 1) for line in (SST2 / "dev.tsv").read_text().splitlines()[1:]]
    dev = {side: [t.strip() for t, y in rows if int(y) == label][:50] for side, label in SIDES.items()}
    nll: dict[str, dict[str, list[float]]] = {}
    for name, folder in default_causal_lm_adapters().items():
        model = lorakit.load_adapter(_base(), folder).eval()
        nll[name] = {side: [_nll(model, tokenizer, [t])[0] for t in texts] for side, texts in dev.items()}
    for side in SIDES:
        other = "negative" if side == "positive" else "positive"
        assert sum(nll[side][side]) < sum(nll[other][side])
    correct = sum(p < n for p, n in zip(nll["positive"]["positive"], nll["negative"]["positive"], strict=True))
    correct += sum(n < p for p, n in zip(nll["positive"]["negative"], nll["negative"]["negative"], strict=True))
    assert correct / 100 >= 0.6
