"""lorakit.hf: task detection, context length, the pad-token fallback, adapter_task, and the
two drifts between the loaders it replaced (a decoder classifier told another pad id than its
batches use; predict crashing on a tokenizer without a pad token)."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import lorakit
from lorakit import hf
from lorakit.cli import main

WORDS = "the a good bad movie film was is not very fun dull plot".split()
TEXTS = ["good", "the movie was not very good", "a dull plot"]


def word_tokenizer(pad: bool) -> PreTrainedTokenizerFast:
    """[PAD]=0, [EOS]=1, [UNK]=2, then WORDS; `pad` False: a decoder-style tokenizer with eos only."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]", *WORDS])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", eos_token="[EOS]", **extra)


def gpt2_classifier_folder(path, pad: bool):
    """A tiny GPT-2 classifier whose config has no pad id (as GPT-2's own) and eos id 1."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1, num_labels=2
    )
    model = GPT2ForSequenceClassification(config)
    model.config.pad_token_id = None
    model.save_pretrained(path)
    word_tokenizer(pad).save_pretrained(path)
    assert json.loads((path / "config.json").read_text()).get("pad_token_id") is None
    return path


# --- task detection ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "task", "task_type"),
    [
        (lambda: tiny.bert(0), hf.CLASSIFY, "SEQ_CLS"),
        (lambda: tiny.gpt2(0), hf.CAUSAL_LM, "CAUSAL_LM"),
        (lambda: tiny.llama(0), hf.CAUSAL_LM, "CAUSAL_LM"),
        (
            lambda: BertModel(
                BertConfig(
                    vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
                )
            ),
            hf.OTHER,
            None,
        ),
        (
            lambda: LlamaForSequenceClassification(
                LlamaConfig(
                    vocab_size=50,
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    pad_token_id=0,
                )
            ),
            hf.CLASSIFY,
            "SEQ_CLS",
        ),
    ],
)
def test_model_task_from_the_model_its_config_and_its_folder(make, task, task_type, tmp_path):
    model = make()
    model.save_pretrained(tmp_path)  # writes config.architectures = [the class name]
    saved = hf.load_config(tmp_path)
    assert saved.architectures == [type(model).__name__]
    for source in (model, saved, tmp_path, str(tmp_path)):
        assert hf.model_task(source) == task
        assert hf.peft_task_type(source) == task_type


def test_a_config_without_architectures_is_other():
    assert hf.model_task(GPT2Config()) == hf.OTHER and hf.peft_task_type(BertConfig()) is None


# --- heads ---------------------------------------------------------------------------------
def test_head_names_are_the_classifier_heads_present():
    assert hf.head_names(tiny.bert(0)) == ["classifier"]
    assert hf.head_names(tiny.gpt2(0)) == []  # lm_head: excluded from all-linear, not trained per adapter
    assert set(hf.CLASSIFIER_HEADS) <= hf.ALL_LINEAR_EXCLUDED_HEADS
    assert "lm_head" in hf.ALL_LINEAR_EXCLUDED_HEADS and "lm_head" not in hf.CLASSIFIER_HEADS


# --- context length --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (BertConfig(max_position_embeddings=96), 96),
        (GPT2Config(n_positions=40), 40),
        (LlamaConfig(max_position_embeddings=300), 300),
    ],
)
def test_context_length_of_each_config_family(config, expected):
    assert hf.context_length(config) == expected
    tokenizer = word_tokenizer(pad=True)
    tokenizer.model_max_length = int(1e30)  # transformers' "no limit" sentinel counts for nothing
    assert hf.context_length(config, tokenizer) == expected
    tokenizer.model_max_length = 17
    assert hf.context_length(config, tokenizer) == 17  # the smaller of the two limits


def test_context_length_unknown_is_none():
    class Bare:
        pass

    assert hf.context_length(Bare()) is None


def test_max_tokens_caps_at_the_context_length(tmp_path):
    from lorakit.train.model import max_tokens

    folder = gpt2_classifier_folder(tmp_path / "gpt", pad=True)
    tokenizer = hf.load_tokenizer(folder)
    assert max_tokens(folder, tokenizer, 1000) == 64 and max_tokens(folder, tokenizer, 10) == 10


# --- tokenizer and pad id ------------------------------------------------------------------
def test_load_tokenizer_pads_with_eos_when_it_has_no_pad_token(tmp_path):
    word_tokenizer(pad=False).save_pretrained(tmp_path / "eos-only")
    assert AutoTokenizer.from_pretrained(tmp_path / "eos-only").pad_token is None
    tokenizer = hf.load_tokenizer(tmp_path / "eos-only")
    assert tokenizer.pad_token == "[EOS]" and tokenizer.pad_token_id == 1
    word_tokenizer(pad=True).save_pretrained(tmp_path / "padded")
    assert hf.load_tokenizer(tmp_path / "padded").pad_token_id == 0  # its own pad token is kept


def test_load_tokenizer_of_a_folder_without_one(tmp_path):
    assert hf.load_tokenizer(tmp_path, required=False) is None
    with pytest.raises(lorakit.LorakitError, match="cannot load its tokenizer"):
        hf.load_tokenizer(tmp_path)


def test_pad_token_id_order():
    tokenizer = word_tokenizer(pad=True)
    assert hf.pad_token_id(tokenizer, GPT2Config(eos_token_id=5)) == 0
    assert hf.pad_token_id(word_tokenizer(pad=False), GPT2Config(eos_token_id=5)) == 1
    assert hf.pad_token_id(None, LlamaConfig(pad_token_id=None, eos_token_id=[7, 9])) == 7  # a list of eos ids
    assert hf.pad_token_id(None, None) == 0


# --- drift 1: a decoder classifier must look for the pad id its batches are padded with ------
def test_trained_decoder_classifier_ignores_padding(tmp_path):
    """The old trainer told the model pad = config eos (1) while batches pad with the tokenizer's
    [PAD] (0): the model then read each padded row's logits off a pad position."""
    from lorakit.train.model import load_model

    folder = gpt2_classifier_folder(tmp_path / "gpt", pad=True)
    model = load_model(folder, "classify", ["neg", "pos"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        batch = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in TEXTS])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


# --- drift 2: predict pads like the trainer does -------------------------------------------
def test_predict_batches_a_tokenizer_without_pad_token(tmp_path, capsys):
    """The trainer padded with eos when the tokenizer has no pad token; predict crashed (exit 1)."""
    folder = gpt2_classifier_folder(tmp_path / "gpt", pad=False)
    assert main(["predict", "--model", str(folder), "--json", *(x for t in TEXTS for x in ("--text", t))]) == 0
    together = [json.loads(line)["probabilities"] for line in capsys.readouterr().out.splitlines()]
    alone = []
    for text in TEXTS:
        assert main(["predict", "--model", str(folder), "--json", "--text", text]) == 0
        alone.append(json.loads(capsys.readouterr().out)["probabilities"])
    assert len(together) == len(TEXTS)
    for got, want in zip(together, alone, strict=True):
        assert got == pytest.approx(want, abs=1e-5)


# --- where the base is ---------------------------------------------------------------------
def test_model_path_messages(tmp_path):
    with pytest.raises(lorakit.LorakitError, match="no such folder"):
        hf.model_path(str(tmp_path / "nope"), hf.CLASSIFY)
    with pytest.raises(lorakit.LorakitError, match=r"not a Hugging Face model folder \(no config.json there\)"):
        hf.model_path(str(tmp_path), hf.CLASSIFY)
    folder = gpt2_classifier_folder(tmp_path / "gpt", pad=True)
    assert hf.model_path(str(folder), hf.CAUSAL_LM) == folder


def test_model_path_default_for_causal_lm_is_the_shipped_gpt():
    from lorakit import defaults

    try:
        expected = defaults.default_causal_lm_path()
    except FileNotFoundError:
        pytest.skip("the shipped SST-2 GPT is not built")
    assert hf.model_path(None, hf.CAUSAL_LM) == expected


# --- adapter_task ----------------------------------------------------------------------------
def test_adapter_task_of_a_saved_classifier_and_causal_lm_adapter(tmp_path):
    from lorakit.train.model import write_card

    bert = tiny.bert(0)
    lorakit.inject(bert, lorakit.LoraConfig(r=2, target_modules=["query"]))
    classify = lorakit.save_adapter(bert, tmp_path / "cls")
    info = hf.adapter_task(classify)
    assert isinstance(info, hf.AdapterTask)
    assert (info.task, info.task_type, info.num_labels, info.labels) == (hf.CLASSIFY, "SEQ_CLS", 3, None)
    write_card(classify, "classify", ["a", "b", "c"], "my-base")
    assert hf.adapter_task(classify).labels == ["a", "b", "c"]

    gpt = tiny.gpt2(0)
    lorakit.inject(gpt, lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    causal = hf.adapter_task(lorakit.save_adapter(gpt, tmp_path / "lm"))
    assert (causal.task, causal.task_type, causal.num_labels, causal.labels) == (hf.CAUSAL_LM, "CAUSAL_LM", None, None)


def test_adapter_task_without_task_type_but_a_head_is_classify(tmp_path):
    bert = tiny.bert(0)
    lorakit.inject(bert, lorakit.LoraConfig(r=2, target_modules=["query"]))
    folder = lorakit.save_adapter(bert, tmp_path / "cls")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["task_type"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    info = hf.adapter_task(folder)
    assert info.task == hf.CLASSIFY and info.num_labels == 3 and info.task_type is None
