"""Loaders the predict, generate, merge and demo commands share: a base model of the right
kind for an adapter, its tokenizer, and the label names of a classifier.

(The leading `_` keeps cli.py from listing this module as a subcommand.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorakit import hf
from lorakit.errors import UsageError
from lorakit.hf import CAUSAL_LM, CLASSIFY, OTHER, load_tokenizer

__all__ = [
    "CAUSAL_LM",
    "CLASSIFY",
    "OTHER",
    "add_model_arguments",
    "fill_from_card",
    "label_names",
    "load_adapted",
    "load_tokenizer",
]


def add_model_arguments(parser: Any, model_help: str, adapter_help: str) -> None:
    """The --model, --adapter and --force flags of the commands that load a base + adapter."""
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--adapter", help=adapter_help)
    parser.add_argument("--force", action="store_true", help="skip the check that the adapter fits this base")


def fill_from_card(args: Any, adapter: str | os.PathLike | None, defaults: dict[str, str | None]) -> None:
    """Set each option named in `defaults` that the user left unset (None): to the value the
    adapter's card records (the columns it was trained on), else to the default given here."""
    from lorakit.files.card import read_card

    card = read_card(adapter) if adapter is not None and Path(adapter).is_dir() else None
    recorded = card.columns() if card is not None else {}
    for name, default in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, recorded.get(name, default))


def label_names(adapter: str | os.PathLike | None, model_config: Any, num_labels: int) -> list[str]:
    """Names of a classifier's outputs, from the first source that has exactly `num_labels`:
    the adapter's lorakit model card (README.md, written by `lorakit train`), `labels` in
    summary.json beside the adapter folder, the model config's id2label; else LABEL_0, ..."""
    candidates: list[Any] = []
    if adapter is not None:
        folder = Path(adapter)
        candidates.append(hf.read_card(folder).get("labels"))
        summary = _read_json(folder.parent / "summary.json")
        candidates.append(summary.get("labels") if isinstance(summary, dict) else None)
    id2label = getattr(model_config, "id2label", None) or {}
    candidates.append([id2label[i] for i in sorted(id2label, key=int)] if id2label else None)
    for names in candidates:
        if isinstance(names, list) and len(names) == num_labels and all(isinstance(n, str | int) for n in names):
            return [str(n) for n in names]
    return [f"LABEL_{i}" for i in range(num_labels)]


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a missing or unreadable side file only means the names come from elsewhere


def load_adapted(
    model: str | None, adapter: str | None, *, task: str | None = None, force: bool = False
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model in eval mode with the adapter loaded, tokenizer or None, info) where info holds
    "task", "labels" (classifier names or None), "model" and "adapter" paths, and "card" (the
    adapter's AdapterCard or None). The base is hf.model_path's: --model, else the adapter's.

    The model class follows the adapter's task_type (or the base's architecture); a
    classifier gets as many outputs as the adapter's saved head. Bad paths, an adapter for
    another base and unreadable files raise LorakitError subclasses (one line each)."""
    from lorakit.files.peft_format import load_adapter

    num_labels, card = None, None
    if adapter is not None:
        saved = hf.adapter_task(adapter)
        if task and saved.task and task != saved.task:
            raise UsageError(f"{adapter} is a {saved.task} adapter; this command needs a {task} adapter")
        task, num_labels, card = task or saved.task, saved.num_labels, saved.card
    path = hf.model_path(model, task or CLASSIFY, adapter)  # --model, else the adapter's base, else the default
    task = task or hf.model_task(path)
    config = hf.load_config(path)
    if task == CLASSIFY and num_labels is not None and getattr(config, "num_labels", None) != num_labels:
        config.num_labels = num_labels  # the fresh head gets the adapter's shape; its weights come from the file
    tokenizer = load_tokenizer(path, required=False)
    net = _from_pretrained(path, task, config, tokenizer)
    if adapter is not None:
        load_adapter(net, adapter, force=force)
    net.eval()
    labels = label_names(adapter, net.config, net.config.num_labels) if task == CLASSIFY else None
    if labels:  # carried into anything saved from this model (a merged folder)
        net.config.id2label = dict(enumerate(labels))
        net.config.label2id = {name: i for i, name in enumerate(labels)}
    return net, tokenizer, {"task": task, "labels": labels, "model": path, "adapter": adapter, "card": card}


def _from_pretrained(path: Path, task: str, config: Any, tokenizer: Any = None) -> nn.Module:
    """hf.load_base with a fixed seed: a head the adapter does not cover is initialised the
    same way every run."""
    torch.manual_seed(0)
    return hf.load_base(path, task, config, tokenizer)
