"""Classify texts with a base model + adapter (or a merged classifier folder).

Texts come from --text (repeatable) or from --data FILE (JSONL, CSV or TSV, read like
`lorakit train` reads them: the --text-column, else `sentence` or `text`). Prints one line per
text: the predicted label, its probability and the text; --json prints one JSON object per
line with the probability of every label instead.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from tqdm import tqdm

from lorakit.commands._common import add_model_arguments

HELP = "classify texts with a model + adapter: label and probabilities per input"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lorakit predict`."""
    add_model_arguments(
        parser,
        model_help="base model folder; default: the adapter's base (its card), else the packaged MiniLM",
        adapter_help="adapter folder (PEFT format); omit it for a merged classifier folder",
    )
    parser.add_argument("--data", help="JSONL, CSV or TSV file with a text column")
    parser.add_argument("--text", action="append", help="a text to classify (repeat for several)")
    parser.add_argument(
        "--text-column", help="column of --data to read (default: the adapter's training column, else text or sentence)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens kept per text (default: 256)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line with every probability")


def run(args: argparse.Namespace) -> int:
    """Load, classify in batches, print."""
    from lorakit.commands._common import CLASSIFY, fill_from_card, load_adapted
    from lorakit.errors import UsageError

    if not args.data and not args.text:
        raise UsageError('nothing to classify: give --text "..." (repeatable) or --data FILE')
    if args.data and args.text:
        raise UsageError("give --text or --data, not both")
    if args.batch_size < 1 or args.max_length < 1:
        raise UsageError("--batch-size and --max-length must be at least 1")
    fill_from_card(args, args.adapter, {"text_column": "text"})
    texts = read_texts(args.data, args.text_column) if args.data else list(args.text)
    model, tokenizer, info = load_adapted(args.model, args.adapter, force=args.force)
    if info["task"] != CLASSIFY:
        raise UsageError(
            f"{args.adapter or info['model']} is a {info['task']} model, not a classifier; "
            "use `lorakit generate` for causal LMs, or give a classification adapter"
        )
    if tokenizer is None:
        raise UsageError(f"{info['model']} has no tokenizer files; predict needs the base model's tokenizer")
    probs = classify(model, tokenizer, texts, args.batch_size, args.max_length)
    labels = info["labels"]
    for text, row in zip(texts, probs.tolist(), strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        if args.json:
            item = {"text": text, "label": labels[best], "probabilities": dict(zip(labels, row, strict=True))}
            print(json.dumps(item, ensure_ascii=False))
        else:
            print(f"{labels[best]}\t{row[best]:.3f}\t{text}")
    return 0


def read_texts(path: str, column: str) -> list[str]:
    """The text column of a data file, read with lorakit.train.data's reader (errors as DataError)."""
    from lorakit.train.data import find_column, read_table

    rows = read_table(path)
    # The fall-backs apply to the default only: a column the user names must exist.
    name = find_column(rows, column, ("sentence", "text") if column == "text" else (), path)
    return [row[name] for row in rows]


def classify(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """Probabilities (len(texts) x labels), batches sorted by length so padding stays small."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.num_labels)
    batches = range(0, len(order), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc="predicting", unit="batch", disable=len(batches) < 4, leave=False):
            index = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in index], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            out[index] = model(**batch).logits.float().softmax(-1)
    return out
