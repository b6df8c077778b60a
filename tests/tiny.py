"""Tiny random Hugging Face models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def _seeded(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def bert(seed: int | None = None) -> BertForSequenceClassification:
    _seeded(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    return BertForSequenceClassification(config)


def gpt2(seed: int | None = None) -> GPT2LMHeadModel:
    _seeded(seed)
    # bos/eos inside the 100-token vocabulary: GPT-2's defaults (50256) only make transformers log noise.
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def llama(seed: int | None = None) -> LlamaForCausalLM:
    _seeded(seed)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)
