"""Extract a LoRA adapter from a fully fine-tuned model.

Each targeted linear layer's change W_tuned - W_base is cut to its best rank-R approximation
(truncated SVD); the adapter is written in PEFT's format with alpha = R (scaling 1). Changed
modules LoRA cannot express (a new classifier head, layer norms, biases) are saved in full.
A per-layer table shows the share of each change's energy (sum of kept sigma^2) kept.

A fine-tuned classifier (*ForSequenceClassification) may be extracted against the plain base
folder it started from (the backbone alone, no classifier): the base is loaded as that
classifier, the fine-tuned head is saved in full (modules_to_save), and the label names
(id2label) go to the adapter's card.

    lorakit extract --base BASE_DIR --tuned TUNED_DIR --rank 16 --out adapter/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit import hf

HELP = "a LoRA adapter from the weight difference of a fully fine-tuned model (truncated SVD)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="folder of the base model (Hugging Face format)")
    parser.add_argument("--tuned", help="folder of the fully fine-tuned model (same architecture)")
    parser.add_argument("--rank", type=int, help="rank R of the extracted adapter")
    parser.add_argument("--out", help="adapter folder to write (PEFT format)")
    parser.add_argument(
        "--targets",
        default="all-linear",
        help="comma-separated module-name suffixes, or 'all-linear' (default: every linear layer but the head)",
    )
    parser.add_argument(
        "--svd",
        choices=["exact", "lowrank"],
        default="exact",
        help="exact SVD, or randomized svd_lowrank (faster on big layers; default: exact)",
    )
    parser.add_argument("--report", help="also write the per-layer report to this JSON file")


def parse_targets(text: str) -> list[str] | str:
    """'all-linear' as is; 'q,v' -> ['q', 'v']."""
    text = text.strip()
    if text == "all-linear":
        return text
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        from lorakit.errors import UsageError

        raise UsageError(f"--targets {text!r} names no module: give suffixes like 'query,value' or 'all-linear'")
    return parts


def load_pretrained(path: str, role: str):
    """A Hugging Face model folder loaded with the class named in its config (offline, fp32)."""
    from lorakit.errors import DataError

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise DataError(f"--{role} {path}: not a model folder (no config.json); give a save_pretrained folder")
    import torch

    try:
        return hf.load_pretrained(folder, hf.saved_class(hf.load_config(folder)), dtype=torch.float32).eval()
    except (OSError, ValueError) as err:
        raise DataError(f"--{role} {path}: cannot load the model ({str(err).splitlines()[0]})") from None


def load_pair(base_path: str, tuned_path: str):
    """(base, tuned), both of the tuned model's class. A plain base folder (the backbone, e.g.
    BertModel) for a fine-tuned classifier loads as that classifier with a fresh head; any other
    mismatch of architectures is one UsageError line."""
    from lorakit.errors import UsageError

    base = load_pretrained(base_path, "base")
    tuned = load_pretrained(tuned_path, "tuned")
    if type(base) is type(tuned):
        return base, tuned
    backbone = getattr(tuned, getattr(tuned, "base_model_prefix", ""), None)
    if type(backbone) is type(base) and hf.model_task(tuned) == hf.CLASSIFY:
        return classifier_base(base_path, tuned), tuned
    raise UsageError(
        f"--base is a {type(base).__name__} but --tuned a {type(tuned).__name__}: give the same architecture"
    )


def classifier_base(path: str, tuned):
    """The plain base folder `path` loaded as `tuned`'s classifier class (its label set, a
    seeded fresh head: the extracted adapter saves the tuned head in full anyway)."""
    import torch

    config = tuned.config
    torch.manual_seed(0)
    options = {"num_labels": config.num_labels, "id2label": config.id2label, "label2id": config.label2id}
    if getattr(config, "pad_token_id", None) is not None:
        options["pad_token_id"] = config.pad_token_id
    return hf.load_pretrained(Path(path), type(tuned), dtype=torch.float32, **options).eval()


def extracted_card(tuned, base_path: str):
    """The card of an extracted adapter: the tuned model's task and (classifier) label names."""
    from lorakit.files.card import AdapterCard, portable_base

    task = hf.model_task(tuned)
    id2label = getattr(tuned.config, "id2label", None) or {}
    labels = [str(id2label[i]) for i in sorted(id2label, key=int)] if task == hf.CLASSIFY and id2label else None
    return AdapterCard(task=task if task != hf.OTHER else None, labels=labels, base=portable_base(base_path))


def run(args: argparse.Namespace) -> int:
    from lorakit.cli import require
    from lorakit.errors import UsageError
    from lorakit.files.atomic import replace_file
    from lorakit.files.card import write_card
    from lorakit.files.peft_format import save_adapter
    from lorakit.tools.extract import extract_adapter

    require(args, "base", "tuned", "rank", "out")
    if args.rank <= 0:
        raise UsageError(f"--rank {args.rank}: must be a positive integer (e.g. 16)")
    targets = parse_targets(args.targets)
    base, tuned = load_pair(args.base, args.tuned)
    model, report = extract_adapter(base, tuned, args.rank, targets, method=args.svd, progress=True)
    folder = save_adapter(model, args.out)
    write_card(folder, extracted_card(tuned, args.base))
    print_report(report, args.rank, args.out)
    if args.report:
        text = json.dumps([r.as_dict() for r in report], indent=2) + "\n"
        replace_file(Path(args.report), lambda tmp: tmp.write_text(text))
    return 0


def print_report(report: list, rank: int, out: str) -> None:
    """The per-layer table and the overall share of the weight change's energy kept."""
    width = max(len(r.name) for r in report)
    print(f"{'layer':<{width}}  rank  energy kept  rel. error  |dW|_F")
    for r in report:
        print(f"{r.name:<{width}}  {r.rank:>4}  {r.energy:>11.4f}  {r.rel_error:>10.4f}  {r.delta_norm:.4g}")
    total = sum(r.delta_norm**2 for r in report)
    kept = sum(r.energy * r.delta_norm**2 for r in report)
    overall = kept / total if total > 0 else 1.0
    print(f"{len(report)} layers, rank {rank}: {overall:.4f} of the weight change's energy kept -> {out}")
