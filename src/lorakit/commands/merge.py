"""Fold an adapter into its base model and write a standard Hugging Face folder.

The result (model weights, config, tokenizer) loads with plain `transformers`, no lorakit or
PEFT needed, and gives the same outputs as base + adapter: the command checks that on a
small input before writing. The output folder is written to a temporary folder first and
renamed into place; a non-empty folder is only replaced with --overwrite.

Also home of the loaders the predict, generate and demo commands share: a base model of
the right kind for an adapter, its tokenizer, and the label names of a classifier.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorakit.atomic import replace_folder
from lorakit.errors import UsageError

HELP = "merge an adapter into its base model: a plain Hugging Face folder with the same outputs"

CLASSIFY, CAUSAL_LM, OTHER = "classify", "causal-lm", "base"
_TASKS = {"SEQ_CLS": CLASSIFY, "CAUSAL_LM": CAUSAL_LM}
_HEAD_KEYS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lorakit merge`."""
    parser.add_argument("--model", help="base model folder (Hugging Face format); default: the packaged MiniLM")
    parser.add_argument("--adapter", help="adapter folder (PEFT format: adapter_config.json + safetensors)")
    parser.add_argument("--out", help="folder to write the merged model to (must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    parser.add_argument("--force", action="store_true", help="skip the check that the adapter fits this base")


def run(args: argparse.Namespace) -> int:
    """Load base + adapter, merge, check, write atomically; print what was written."""
    from lorakit.adapters import merge_and_unload
    from lorakit.cli import require
    from lorakit.defaults import offline

    require(args, "adapter", "out")
    out = Path(args.out)
    check_output_folder(out, args.overwrite, model_path=args.model)
    model, tokenizer, info = load_adapted(args.model, args.adapter, force=args.force)
    probe = _probe_inputs(model, tokenizer)
    with torch.inference_mode():
        before = _logits(model(**probe))
        plain = merge_and_unload(model)
        after = _logits(plain(**probe))
    diff = (after.float() - before.float()).abs().max().item()

    def write(folder: Path) -> None:
        plain.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    offline()  # loading turned transformers' own progress bars back on
    write_folder_atomically(out, write)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"merged {info['adapter']} into {info['model']} ({info['task']}): {out} ({size:.1f} MiB)")
    print(f"check: merged vs base+adapter on a probe batch, max |diff| of outputs = {diff:.2e}")
    if tokenizer is None:
        print("note: the base folder has no tokenizer, so none was copied")
    return 0


# --- shared loaders ------------------------------------------------------------------------------
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
    from lorakit.io import read_adapter

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
    from lorakit.io import load_adapter

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
        return cls.from_pretrained(path, config=config)
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


# --- output ------------------------------------------------------------------------------------
def check_output_folder(out: Path, overwrite: bool, model_path: str | None = None) -> None:
    """Refuse a file, a non-empty folder (without `overwrite`), or the base model's own folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder path")
    if model_path and out.exists() and out.resolve() == Path(model_path).resolve():
        raise UsageError(f"--out {out} is the base model's folder; write the merged model somewhere else")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; choose a new folder or pass --overwrite")


def write_folder_atomically(out: Path, write) -> Path:
    """Call write(tmp) on a temp folder beside `out`, then put it in place of `out` by renames;
    on any error `out` is left as it was."""
    return replace_folder(out, write)


def _probe_inputs(model: nn.Module, tokenizer: Any) -> dict[str, torch.Tensor]:
    if tokenizer is not None:
        texts = ["lorakit checks the merged model", "a second, longer sentence to check padding too"]
        if getattr(tokenizer, "pad_token", None) is None:
            return dict(tokenizer(texts[:1], return_tensors="pt"))
        return dict(tokenizer(texts, padding=True, return_tensors="pt"))
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    return {"input_ids": torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))}


def _logits(output: Any) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
