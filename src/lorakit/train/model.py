"""Base models for training and evaluation: a config with the trainer's dropout and labels, the
model card; loading itself is lorakit.hf's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from lorakit import hf
from lorakit.errors import UsageError

# Loading, task and limits live in lorakit.hf; these names stay importable from here for the trainer.
from lorakit.hf import head_names, load_tokenizer, model_path, read_card

__all__ = ["head_names", "load_model", "load_tokenizer", "max_tokens", "model_path", "read_card"]


def set_model_dropout(config: Any, p: float) -> list[str]:
    """Set every float dropout probability of a transformers config to `p`; the names changed."""
    changed = []
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, p)
            changed.append(key)
    return changed


def max_tokens(path: Path, tokenizer: Any, wanted: int) -> int:
    """`wanted`, capped at what the model can take (its position table) and the tokenizer's
    limit: a longer example would crash inside the model instead of being truncated."""
    limit = hf.context_length(hf.load_config(path), tokenizer)
    return min(wanted, limit) if limit else wanted


def default_max_length(task: str) -> int:
    """--max-length when not given: 256 tokens for classify (lorakit's long-standing default;
    sentences are short), the whole context for a causal LM (max_tokens caps it to the model's)."""
    return 256 if task == hf.CLASSIFY else 1 << 30


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """--gradient-checkpointing: recompute each layer's activations in backward instead of keeping
    them. On an 8-layer, 256-wide Llama with LoRA r 8, batch 4 x 2048 tokens on a CPU, the step's
    peak RSS growth went from ~2.1 GiB to 1.0-1.2 GiB (ru_maxrss in fresh processes, three runs).
    Non-reentrant checkpointing (use_reentrant=False, what torch recommends) propagates gradients
    to the LoRA weights inside a layer even when its input needs none; the embedding output is
    made to require grad anyway (enable_input_require_grads, as PEFT does), which the reentrant
    variant needs, so either works with a frozen base."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"--gradient-checkpointing: {type(model).__name__} does not support it; drop the flag")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputing


def load_model(path: Path, task: str, labels: list[str] | None = None, model_dropout: float | None = None) -> nn.Module:
    """A transformers model for the task: a fresh classification head sized by `labels`, or a causal LM."""
    config = hf.load_config(path)
    if model_dropout is not None:
        set_model_dropout(config, model_dropout)
    if task == hf.CLASSIFY:
        assert labels is not None
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    return hf.load_base(path, task if task == hf.CLASSIFY else hf.CAUSAL_LM, config)


def write_card(adapter_dir: Path, task: str, labels: list[str] | None, base: str, **recorded: str | None) -> None:
    """README.md in the adapter folder: this run's adapter card (lorakit.files.card)."""
    from lorakit.files.card import write_training_card

    write_training_card(adapter_dir, task, labels, base, **recorded)
