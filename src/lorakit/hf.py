"""Everything lorakit knows about Hugging Face model folders, in one place: where the base is
(a --model folder or a packaged default), how it loads (safetensors only, offline), its
tokenizer (with the one pad-token fallback), its task, its head modules, its context length,
and the task recorded in an adapter folder.

transformers is imported inside the functions: `import lorakit` stays light, and
lorakit.core can use the head names without pulling in transformers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import UsageError
from lorakit.files.card import CARD_KEY  # noqa: F401  (the README.md line of an adapter card; importable here)

CLASSIFY, CAUSAL_LM, OTHER = "classify", "causal-lm", "base"

# PEFT's task_type (adapter_config.json) -> lorakit's task; other task types lorakit does not run.
PEFT_TASKS = {"SEQ_CLS": CLASSIFY, "CAUSAL_LM": CAUSAL_LM}

# transformers class-name endings -> PEFT task_type: how a model (or a config's
# `architectures`) says what it is for. First match wins.
_CLASS_MARKERS = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)

# Output heads that target_modules="all-linear" leaves alone: a LoRA on an output head is
# almost never wanted (the model's output embedding is excluded too, whatever its name).
ALL_LINEAR_EXCLUDED_HEADS = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls"})

# Classification heads: freshly initialised for a new label set, so they are trained in full and
# saved with each adapter (modules_to_save), as PEFT does for SEQ_CLS.
CLASSIFIER_HEADS = ("classifier", "score")

# Tensor names (suffixes) of a saved classifier head's output layer: its rows are the labels.
# RoBERTa-style heads keep theirs in classifier.out_proj.
_HEAD_WEIGHTS = tuple(f"{name}.weight" for name in CLASSIFIER_HEADS) + ("classifier.out_proj.weight",)


_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
_NO_LIMIT = 1_000_000  # tokenizers say "no limit" with a huge sentinel (int(1e30))


# --- where the base model is --------------------------------------------------------------
def model_path(given: str | os.PathLike | None, task: str, adapter: str | os.PathLike | None = None) -> Path:
    """The base model folder every command uses, picked one way: the --model folder (checked)
    wins; else the base `adapter` records (its card's, resolved on this install, else an
    existing folder its adapter_config.json names); else the packaged default for `task`: the
    small SST-2 GPT for causal-lm, MiniLM otherwise. Each problem is one UsageError line."""
    if given:
        path = Path(given)
        if not path.is_dir():
            raise UsageError(f"--model {given}: not a Hugging Face model folder (no such folder); check the path")
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {given}: not a Hugging Face model folder (no config.json there); check the path")
        return path
    recorded = recorded_base(adapter) if adapter is not None else None
    if recorded is not None:
        return recorded
    from lorakit import defaults

    try:
        return defaults.default_causal_lm_path() if task == CAUSAL_LM else defaults.default_model_path()
    except FileNotFoundError as err:
        raise UsageError(f"no --model given and the default model is unavailable ({err}); pass --model") from None


def recorded_base(adapter: str | os.PathLike) -> Path | None:
    """The base folder adapter folder `adapter` was made on, when it says so: its card's base
    (a UsageError when the card names one that is not here: never a quiet fall-back to another
    model), else base_model_name_or_path when that is a model folder here; None otherwise."""
    from lorakit.files.card import read_card as read_adapter_card

    card = read_adapter_card(adapter)
    if card is not None and card.base:
        found = card.base_path()
        if found is None:
            raise UsageError(
                f"{adapter} was trained on base {card.base!r}, which is not a model folder here; "
                "pass --model BASE_DIR (the same base)"
            )
        return found
    try:
        data = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # read_adapter reports a broken folder when the adapter is loaded
    named = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if isinstance(named, str) and named and (Path(named) / "config.json").is_file():
        return Path(named)
    return None


# --- what the model is for ----------------------------------------------------------------
def peft_task_type(source: Any) -> str | None:
    """PEFT's task_type for a model, a config (its `architectures`) or a model folder; None if unknown."""
    for name in _class_names(source):
        for marker, task_type in _CLASS_MARKERS:
            if marker in name:
                return task_type
    return None


def model_task(source: Any) -> str:
    """lorakit's task (CLASSIFY, CAUSAL_LM or OTHER) for a model, a config or a model folder."""
    return PEFT_TASKS.get(peft_task_type(source) or "", OTHER)


def _class_names(source: Any) -> list[str]:
    if isinstance(source, str | os.PathLike):
        data = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
        return list(data.get("architectures") or [])
    if hasattr(source, "architectures"):  # a transformers config
        return list(source.architectures or [])
    return [type(source).__name__]  # a model


def head_names(model: Any) -> list[str]:
    """The classification heads among `model`'s children (trained in full, saved with the adapter)."""
    return [name for name, _ in model.named_children() if name in CLASSIFIER_HEADS]


# --- what it can take ----------------------------------------------------------------------
def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The most tokens the model takes: the smallest of its config's position limits and the
    tokenizer's model_max_length (when a real limit); None when neither says."""
    limits = [getattr(config, name, None) for name in _POSITION_FIELDS]
    limits.append(getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None)
    real = [n for n in limits if isinstance(n, int) and not isinstance(n, bool) and 0 < n < _NO_LIMIT]
    return min(real) if real else None


# --- loading -------------------------------------------------------------------------------
def load_tokenizer(path: str | os.PathLike, required: bool = True) -> Any:
    """The folder's tokenizer, read locally, with a pad token: the eos token when it has none
    (as decoder-only tokenizers ship), so batches pad the same way in training and inference.
    None (or a UsageError when `required`) if the folder has no usable tokenizer."""
    from transformers import AutoTokenizer

    from lorakit.defaults import offline

    offline()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as err:
        if not required:
            return None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {path}: cannot load its tokenizer ({first}); add its tokenizer files") from None
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_token_id(tokenizer: Any = None, config: Any = None) -> int:
    """The id batches are padded with: the tokenizer's pad, else its eos, else the config's
    pad, else its (first) eos, else 0. A decoder classifier must be told this same id: it
    finds each row's last real token by it."""
    candidates = [getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    candidates += [getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)]
    for value in candidates:
        if isinstance(value, list | tuple):  # Llama-3-style configs list several eos ids
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


def load_config(path: str | os.PathLike) -> Any:
    """The folder's transformers config, read locally."""
    from transformers import AutoConfig

    from lorakit.defaults import offline

    offline()
    return AutoConfig.from_pretrained(str(path))


def load_base(path: str | os.PathLike, task: str, config: Any = None, tokenizer: Any = None) -> Any:
    """The base model for `task` (AutoModelForSequenceClassification, AutoModelForCausalLM, else
    AutoModel) from a local folder (see load_pretrained); `config` defaults to the folder's. A
    classifier without a pad id gets the one its batches are padded with (`tokenizer`'s, else the
    folder's tokenizer's). A folder that does not load is one UsageError line."""
    import transformers

    config = load_config(path) if config is None else config
    if task == CLASSIFY and getattr(config, "pad_token_id", None) is None:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path, required=False)
        config.pad_token_id = pad_token_id(tokenizer, config)
    cls = {
        CLASSIFY: transformers.AutoModelForSequenceClassification,
        CAUSAL_LM: transformers.AutoModelForCausalLM,
    }.get(task, transformers.AutoModel)
    try:
        return load_pretrained(path, cls, config=config)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load {path} as a {task} model: {first}") from None


def saved_class(config: Any) -> type:
    """The transformers class a config's `architectures` names (AutoModel when it names none)."""
    import transformers

    names = getattr(config, "architectures", None) or []
    return (getattr(transformers, names[0], None) if names else None) or transformers.AutoModel


def load_pretrained(path: str | os.PathLike, cls: type, **options: Any) -> Any:
    """`cls.from_pretrained(path, **options)`, read locally and from safetensors only: a
    pytorch_model.bin is a pickle, and nothing lorakit reads is unpickled. Errors pass through."""
    from lorakit.defaults import offline

    offline()
    return cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **options)


# --- what an adapter is for ----------------------------------------------------------------
@dataclass(frozen=True)
class AdapterTask:
    """What an adapter folder says about its task (read by `adapter_task`)."""

    task: str | None  # CLASSIFY or CAUSAL_LM; None when neither the card nor task_type says
    task_type: str | None  # PEFT's task_type as written in adapter_config.json
    num_labels: int | None  # rows of the saved classifier head (None: no head saved)
    labels: list[str] | None  # label names from the lorakit model card (None: no card or none there)
    base: str | None  # base_model_name_or_path from adapter_config.json
    card: Any = None  # the folder's lorakit.files.card.AdapterCard (None: it has none)


def adapter_task(folder: str | os.PathLike) -> AdapterTask:
    """The task of an adapter folder: its lorakit card (README.md, written by `lorakit train`),
    else adapter_config.json's task_type, else classify when a classifier head is saved.
    The folder (and its card) is validated first (AdapterError when broken)."""
    from lorakit.files.card import read_card as read_adapter_card
    from lorakit.files.peft_format import read_adapter

    _, tensors, _ = read_adapter(folder)
    folder = Path(folder)
    data = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    card = read_adapter_card(folder)
    heads = [t for k, t in tensors.items() if any(k == h or k.endswith("." + h) for h in _HEAD_WEIGHTS)]
    num_labels = int(heads[0].shape[0]) if heads else None
    task_type = data.get("task_type")
    task = (card.task if card else None) or PEFT_TASKS.get(str(task_type))
    if task is None and num_labels is not None:
        task = CLASSIFY
    return AdapterTask(
        task=task,
        task_type=task_type,
        num_labels=num_labels,
        labels=card.labels if card else None,
        base=data.get("base_model_name_or_path"),
        card=card,
    )


def read_card(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The adapter's card (lorakit.files.card) as a plain dict ({} when it has none)."""
    from lorakit.files.card import read_card as read_adapter_card

    card = read_adapter_card(adapter_dir)
    return card.to_json() if card is not None else {}
