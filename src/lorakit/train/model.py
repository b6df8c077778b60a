"""Base models for training and evaluation: loading, the model's own dropout, task info on adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from lorakit.errors import UsageError

HEAD_NAMES = ("classifier", "score")
CARD_KEY = "lorakit:"  # README.md front-matter line holding the task and label names (JSON)


def default_model(task: str) -> Path:
    """The packaged default base: MiniLM for classify, the packaged small GPT for causal-lm."""
    from lorakit import defaults

    if task == "causal-lm":
        finder = getattr(defaults, "default_causal_lm_path", None)
        if finder is None:
            raise UsageError("--model is required for --task causal-lm: give a local Hugging Face causal LM folder")
        return Path(finder())
    return defaults.default_model_path()


def model_path(given: str | None, task: str) -> Path:
    """The --model folder (checked) or the task's default."""
    if not given:
        return default_model(task)
    path = Path(given)
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {given}: not a Hugging Face model folder (no config.json there); check the path")
    return path


def set_model_dropout(config: Any, p: float) -> list[str]:
    """Set every float dropout probability of a transformers config to `p`; the names changed."""
    changed = []
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, p)
            changed.append(key)
    return changed


def load_tokenizer(path: Path) -> Any:
    """The model folder's tokenizer (read locally, never downloaded)."""
    from transformers import AutoTokenizer

    from lorakit.defaults import offline

    offline()
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {path}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None


def max_tokens(path: Path, tokenizer: Any, wanted: int) -> int:
    """`wanted`, capped at what the model can take (its position table) and the tokenizer's
    limit: a longer example would crash inside the model instead of being truncated."""
    from transformers import AutoConfig

    limits = [wanted]
    config = AutoConfig.from_pretrained(str(path))
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:  # "no limit" is a huge sentinel
        limits.append(tok_limit)
    return min(limits)


def load_model(path: Path, task: str, labels: list[str] | None = None, model_dropout: float | None = None) -> nn.Module:
    """A transformers model for the task: a fresh classification head sized by `labels`, or a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lorakit.defaults import offline

    offline()
    config = AutoConfig.from_pretrained(str(path))
    if model_dropout is not None:
        set_model_dropout(config, model_dropout)
    if task == "classify":
        assert labels is not None
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        if getattr(config, "pad_token_id", None) is None:  # decoder classifiers find the last real token by it
            config.pad_token_id = getattr(config, "eos_token_id", None) or 0
        return AutoModelForSequenceClassification.from_pretrained(str(path), config=config, use_safetensors=True)
    # safetensors only: a pytorch_model.bin is a pickle, and nothing lorakit reads is unpickled.
    return AutoModelForCausalLM.from_pretrained(str(path), config=config, use_safetensors=True)


def head_names(model: nn.Module) -> list[str]:
    """The classification head modules present in `model` (trained in full, saved with the adapter)."""
    return [name for name, _ in model.named_children() if name in HEAD_NAMES]


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


def read_card(adapter_dir: Path) -> dict[str, Any]:
    """The task info write_card stored ({} when the adapter has no lorakit card)."""
    card = adapter_dir / "README.md"
    if not card.is_file():
        return {}
    for line in card.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(CARD_KEY):
            try:
                return json.loads(line[len(CARD_KEY) :])
            except json.JSONDecodeError:
                return {}
    return {}
