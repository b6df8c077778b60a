"""Evaluate a trained adapter on a data file: accuracy and macro-F1 (classify) or loss and
perplexity (causal-lm). The task, the label set, the base model and the data columns come from the adapter (its
lorakit card, else its adapter_config.json and saved head); flags given win.

  lorakit eval --adapter runs/sst2/adapter --data dev.tsv
  lorakit eval --model ./gpt --adapter runs/chat --data test.jsonl --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.errors import UsageError

COLUMN_DEFAULTS = {"text_column": "text", "label_column": "label", "prompt_column": None, "completion_column": None}
HELP = "evaluate an adapter on a data file (accuracy / macro-F1, or loss / perplexity)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `lorakit eval`."""
    parser.add_argument("--model", help="base model folder (default: the one the adapter was trained on)")
    parser.add_argument("--adapter", metavar="DIR", help="adapter folder, or a `lorakit train` run folder")
    parser.add_argument("--data", metavar="FILE", help="evaluation data: .jsonl, .csv or .tsv")
    recorded = "default: the adapter's training column, else"
    parser.add_argument("--text-column", help=f"text column ({recorded} text or sentence)")
    parser.add_argument("--label-column", help=f"label column for classify ({recorded} label)")
    parser.add_argument("--prompt-column", help=f"causal-lm: prompt column ({recorded} none)")
    parser.add_argument("--completion-column", help=f"causal-lm: completion column ({recorded} none)")
    parser.add_argument("--max-length", type=int, default=256, help="truncate examples to this many tokens")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def adapter_folder(given: str) -> Path:
    """The adapter folder itself, or the adapter/ of a run folder."""
    path = Path(given)
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    return path


def evaluation_task(folder: Path) -> tuple[str, list[str] | None, str | None]:
    """(task, label names or None, base model path or None) of an adapter folder, from
    hf.adapter_task; a classifier without card labels gets "0", "1", ... by its saved head."""
    from lorakit import hf

    info = hf.adapter_task(folder)  # validates the folder: AdapterError if broken
    if info.task is None:
        raise UsageError(f"{folder}: task_type {info.task_type!r} is not one lorakit evaluates (SEQ_CLS, CAUSAL_LM)")
    labels = info.labels
    if info.task == hf.CLASSIFY and not labels:
        if info.num_labels is None:
            raise UsageError(f"{folder}: a classification adapter without a saved head; nothing to evaluate")
        labels = [str(i) for i in range(info.num_labels)]
    return info.task, labels, info.base


def run(args: argparse.Namespace) -> int:
    """Load base + adapter, evaluate, print the metrics."""
    import lorakit
    from lorakit.cli import require
    from lorakit.commands._common import fill_from_card
    from lorakit.hf import model_path
    from lorakit.train import chat
    from lorakit.train.data import CausalLMData, ClassificationData, read_table
    from lorakit.train.evaluate import evaluate
    from lorakit.train.model import load_model, load_tokenizer, max_tokens
    from lorakit.train.prepare import chat_dataset, is_chat_file

    require(args, "adapter", "data")
    folder = adapter_folder(args.adapter)
    task, labels, _ = evaluation_task(folder)
    fill_from_card(args, folder, COLUMN_DEFAULTS)
    path = model_path(args.model, task, folder)  # --model, else the adapter's recorded base, else the default
    tokenizer = load_tokenizer(path)
    limit = max_tokens(path, tokenizer, args.max_length)
    common = {"text_column": args.text_column, "max_length": limit, "path": args.data}
    if task == "classify":
        rows = read_table(args.data)
        data = ClassificationData.from_rows(rows, tokenizer, label_column=args.label_column, labels=labels, **common)
    elif is_chat_file(args.data) and not args.prompt_column:  # loss on the assistant turns, as trained
        template = chat.read_template(folder) or chat.template_for(tokenizer)
        data = chat_dataset(args.data, tokenizer, template, limit)
    else:
        columns = {"prompt_column": args.prompt_column, "completion_column": args.completion_column}
        data = CausalLMData.from_rows(read_table(args.data), tokenizer, **columns, **common)
    model = load_model(path, task, labels)
    lorakit.load_adapter(model, folder)  # AdapterError for an adapter made for another base
    metrics = evaluate(model, tokenizer, data, batch_size=args.batch_size)
    metrics["examples"] = len(data)
    if args.json:
        print(json.dumps({"task": task, **metrics}))
    else:
        print(f"{task} on {args.data} ({len(data)} examples):")
        for key, value in metrics.items():
            if key != "examples":
                print(f"  {key:<11} {value:.4f}")
    return 0
