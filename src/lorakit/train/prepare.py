"""Before the first step: data sets, the run folder check, the precision and the lr schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import DataError, UsageError
from lorakit.train import checkpoint as ckpt
from lorakit.train.config import TrainConfig
from lorakit.train.data import SUFFIXES, CausalLMData, ClassificationData, read_table, split_rows
from lorakit.train.report import SUMMARY_FILE

CHAT_KEYS = ("messages", "conversations")  # what makes a causal-lm JSONL chat data (lorakit.train.chat)


def build_datasets(config: TrainConfig, tokenizer: Any) -> tuple[Any, Any | None]:
    """(train, eval or None) tokenized; every data problem is a DataError before anything is written.
    A causal-lm JSONL of `messages` / `conversations` records is chat data (see is_chat_data)."""
    if is_chat_data(config):
        return _chat_datasets(config, tokenizer)
    rows = read_table(config.train)
    eval_rows, eval_path = None, config.eval
    if config.eval:
        eval_rows = read_table(config.eval)
    elif config.eval_split:
        rows, eval_rows = split_rows(rows, config.eval_split, config.seed)
        eval_path = f"{config.train} (held-out split)"
    common = {"text_column": config.text_column, "max_length": config.max_length}
    if config.task == "classify":
        train = ClassificationData.from_rows(
            rows, tokenizer, label_column=config.label_column, path=config.train, **common
        )
        held = None
        if eval_rows is not None:
            held = ClassificationData.from_rows(
                eval_rows, tokenizer, label_column=config.label_column, labels=train.labels, path=eval_path, **common
            )
        return train, held
    lm = {"prompt_column": config.prompt_column, "completion_column": config.completion_column, **common}
    train = CausalLMData.from_rows(rows, tokenizer, path=config.train, **lm)
    held = CausalLMData.from_rows(eval_rows, tokenizer, path=eval_path, **lm) if eval_rows is not None else None
    return train, held


def is_chat_data(config: TrainConfig) -> bool:
    """Whether a causal-lm run reads conversations: no prompt/completion columns are named and
    the file's first JSON record has "messages" (OpenAI) or "conversations" (ShareGPT). A text
    column that holds a list (a conversation) is refused: its JSON text is no training text."""
    if config.task != "causal-lm" or config.prompt_column or config.completion_column:
        return False
    first = _first_json_record(Path(config.train))
    if first is None:
        return False
    value = first.get(config.text_column)
    if isinstance(value, list | dict):
        raise DataError(
            f"{config.train}: --text-column {config.text_column} holds a {type(value).__name__}, not text; "
            "for chat data drop --text-column: 'messages' (OpenAI) or 'conversations' (ShareGPT) records "
            "are read as conversations"
        )
    return config.text_column == "text" and "text" not in first and any(k in first for k in CHAT_KEYS)


def is_chat_file(path: str | Path) -> bool:
    """Whether a data file holds conversations (its first JSON record has messages / conversations)."""
    first = _first_json_record(Path(path))
    return first is not None and "text" not in first and any(k in first for k in CHAT_KEYS)


def chat_dataset(
    path: str | Path, tokenizer: Any, template: str, max_length: int, train_on_prompt: bool = False
) -> CausalLMData:
    """A conversations file tokenized with `template` (the adapter's, for evaluation)."""
    from lorakit.train import chat

    conversations = chat.read_conversations(path)
    examples, truncated = chat.encode_conversations(tokenizer, conversations, template, max_length, train_on_prompt)
    return CausalLMData(examples, truncated=truncated, chat_template=template)


def _first_json_record(file: Path) -> dict[str, Any] | None:
    """The first record of a JSON-lines file, or None (another format, or not readable as JSON:
    read_table reports those problems)."""
    if SUFFIXES.get(file.suffix.lower()) != "jsonl" or not file.is_file():
        return None
    with file.open(encoding="utf-8-sig", errors="replace") as handle:
        line = next((line for line in handle if line.strip()), "")
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _chat_datasets(config: TrainConfig, tokenizer: Any) -> tuple[CausalLMData, CausalLMData | None]:
    """Conversations rendered with the tokenizer's chat template (or chat.DEFAULT_CHAT_TEMPLATE)."""
    from lorakit.train import chat

    template = chat.template_for(tokenizer)
    conversations = chat.read_conversations(config.train)
    held = chat.read_conversations(config.eval) if config.eval else None
    if config.eval_split:
        conversations, held = split_rows(conversations, config.eval_split, config.seed)

    def encoded(items: list) -> CausalLMData:
        examples, truncated = chat.encode_conversations(
            tokenizer, items, template, config.max_length, config.train_on_prompt
        )
        return CausalLMData(examples, truncated=truncated, chat_template=template)

    return encoded(conversations), encoded(held) if held is not None else None


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a finished or unfinished run unless told to (nothing is deleted here)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the run")
    finished = (out / SUMMARY_FILE).is_file()
    pending = ckpt.has_checkpoint(out)
    if resume:
        if finished and not pending:
            raise UsageError(f"--resume: the run in {out} has finished; nothing to resume (use --overwrite to redo it)")
        return
    if overwrite:
        return
    if finished:
        raise UsageError(f"--out {out} holds a finished run; pass --overwrite to replace it or choose another folder")
    if pending:
        raise UsageError(f"--out {out} holds an unfinished run; pass --resume to continue it or --overwrite")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32) for --precision on this device."""
    cuda = device.type == "cuda"
    if precision == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    if precision == "fp16" and not cuda:
        raise UsageError("--precision fp16 needs a CUDA GPU; use fp32 (or bf16) on a CPU")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bf16; use fp16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak lr at each step: linear warm-up, then linear or cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return factor
