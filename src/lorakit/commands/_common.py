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

from lorakit.errors import UsageError

CLASSIFY, CAUSAL_LM, OTHER = "classify", "causal-lm", "base"
_TASKS = {"SEQ_CLS": CLASSIFY, "CAUSAL_LM": CAUSAL_LM}
_HEAD_KEYS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def resolve_model_path(model: str | None, task: str) -> Path:
    """The base model folder: `model` checked, or the packaged default for the task."""
    from lorakit import defaults

    if model:
        path = Path(model)
        if not path.is_dir():
            raise UsageError(f"--model {model}: no such folder; give a local Hugging Face model folder")
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {model}: no config.json there; it is not a Hugging Face model folder")
        return path
    try:
        if task == CAUSAL_LM:
            return defaults.default_causal_lm_path()
        return defaults.default_model_path()
    except (FileNotFoundError, AttributeError) as err:
        raise UsageError(f"no --model given and the default model is unavailable ({err}); pass --model") from None


def adapter_task(adapter: str | os.PathLike) -> tuple[str | None, int | None]:
    """(task, number of labels of the saved classifier head) read from an adapter folder."""
    from lorakit.files.peft_format import read_adapter

    _, tensors, _ = read_adapter(adapter)
    data = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    heads = [t for k, t in tensors.items() if any(k == h or k.endswith("." + h) for h in _HEAD_KEYS)]
    num_labels = int(heads[0].shape[0]) if heads else None
    task = _TASKS.get(str(data.get("task_type")))
    if task is None and num_labels is not None:
        task = CLASSIFY
    return task, num_labels


def _model_task(path: Path) -> str:
    data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    names = " ".join(data.get("architectures") or [])
    if "ForCausalLM" in names or "LMHeadModel" in names:
        return CAUSAL_LM
    if "ForSequenceClassification" in names:
        return CLASSIFY
    return OTHER


def label_names(adapter: str | os.PathLike | None, model_config: Any, num_labels: int) -> list[str]:
    """Names of a classifier's outputs, from the first source that has exactly `num_labels`:
    the adapter's lorakit model card (README.md, written by `lorakit train`), `labels` in
    summary.json beside the adapter folder, the model config's id2label; else LABEL_0, ..."""
    from lorakit.train.model import read_card

    candidates: list[Any] = []
    if adapter is not None:
        folder = Path(adapter)
        candidates.append(read_card(folder).get("labels"))
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
    "task", "labels" (classifier names or None), "model" and "adapter" paths.

    The model class follows the adapter's task_type (or the base's architecture); a
    classifier gets as many outputs as the adapter's saved head. Bad paths, an adapter for
    another base and unreadable files raise LorakitError subclasses (one line each)."""
    from transformers import AutoConfig

    from lorakit.defaults import offline
    from lorakit.files.peft_format import load_adapter

    offline()
    num_labels = None
    if adapter is not None:
        saved_task, num_labels = adapter_task(adapter)
        if task and saved_task and task != saved_task:
            raise UsageError(f"{adapter} is a {saved_task} adapter; this command needs a {task} adapter")
        task = task or saved_task
    path = resolve_model_path(model, task or CLASSIFY)
    task = task or _model_task(path)
    config = AutoConfig.from_pretrained(path)
    if task == CLASSIFY and num_labels is not None and getattr(config, "num_labels", None) != num_labels:
        config.num_labels = num_labels  # the fresh head gets the adapter's shape; its weights come from the file
    if task == CLASSIFY and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0  # as `lorakit train` sets it for decoders
    net = _from_pretrained(path, task, config)
    if adapter is not None:
        load_adapter(net, adapter, force=force)
    net.eval()
    labels = label_names(adapter, net.config, net.config.num_labels) if task == CLASSIFY else None
    if labels:  # carried into anything saved from this model (a merged folder)
        net.config.id2label = dict(enumerate(labels))
        net.config.label2id = {name: i for i, name in enumerate(labels)}
    return (
        net,
        load_tokenizer(path, required=False),
        {"task": task, "labels": labels, "model": path, "adapter": adapter},
    )


def _from_pretrained(path: Path, task: str, config: Any) -> nn.Module:
    import transformers

    cls = {
        CLASSIFY: transformers.AutoModelForSequenceClassification,
        CAUSAL_LM: transformers.AutoModelForCausalLM,
    }.get(task, transformers.AutoModel)
    try:
        # A fixed seed: a head the adapter does not cover is initialised the same way every run.
        torch.manual_seed(0)
        # safetensors only: a pytorch_model.bin is a pickle, and nothing lorakit reads is unpickled.
        return cls.from_pretrained(path, config=config, use_safetensors=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load {path} as a {task} model: {first}") from None


def load_tokenizer(path: str | os.PathLike, required: bool = True) -> Any:
    """The folder's tokenizer; None (or a UsageError when `required`) if it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        if required:
            raise UsageError(
                f"{path} has no usable tokenizer ({type(err).__name__}); add its tokenizer files"
            ) from None
        return None
