"""Base models for training and evaluation: a config with the trainer's dropout and labels, the
model card; loading itself is lorakit.hf's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from lorakit import hf

# Loading, task and limits live in lorakit.hf; these names stay importable from here for the trainer.
from lorakit.hf import CARD_KEY, head_names, load_tokenizer, model_path, read_card

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


def write_card(adapter_dir: Path, task: str, labels: list[str] | None, base: str) -> None:
    """README.md in the adapter folder (where PEFT writes its model card): front matter that
    Hugging Face tools read, plus the task and label names `lorakit eval` needs."""
    from lorakit.train.report import write_atomically

    info = {"task": task, "labels": labels}
    text = (
        "---\nlibrary_name: peft\ntags: [lora, lorakit]\n"
        f"base_model: {json.dumps(base)}\n{CARD_KEY} {json.dumps(info)}\n---\n\n"
        f"# LoRA adapter ({task})\n\nTrained with `lorakit train`. Labels: {', '.join(labels or []) or 'n/a'}.\n"
    )
    write_atomically(adapter_dir / "README.md", text)
