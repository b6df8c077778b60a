"""Extract a LoRA adapter from a fully fine-tuned model.

Each targeted linear layer's change W_tuned - W_base is cut to its best rank-R approximation
(truncated SVD); the adapter is written in PEFT's format with alpha = R (scaling 1). Changed
modules LoRA cannot express (a new classifier head, layer norms, biases) are saved in full.
A per-layer table shows the share of each change's energy (sum of kept sigma^2) kept.

    lorakit extract --base BASE_DIR --tuned TUNED_DIR --rank 16 --out adapter/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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

    from lorakit import hf

    try:
        return hf.load_pretrained(folder, hf.saved_class(hf.load_config(folder)), dtype=torch.float32).eval()
    except (OSError, ValueError) as err:
        raise DataError(f"--{role} {path}: cannot load the model ({str(err).splitlines()[0]})") from None


def run(args: argparse.Namespace) -> int:
    from lorakit.cli import require
    from lorakit.errors import UsageError
    from lorakit.files.atomic import replace_file
    from lorakit.files.peft_format import save_adapter
    from lorakit.tools.extract import extract_adapter

    require(args, "base", "tuned", "rank", "out")
    if args.rank <= 0:
        raise UsageError(f"--rank {args.rank}: must be a positive integer (e.g. 16)")
    targets = parse_targets(args.targets)
    base = load_pretrained(args.base, "base")
    tuned = load_pretrained(args.tuned, "tuned")
    if type(base) is not type(tuned):
        raise UsageError(
            f"--base is a {type(base).__name__} but --tuned a {type(tuned).__name__}: give the same architecture"
        )
    model, report = extract_adapter(base, tuned, args.rank, targets, method=args.svd, progress=True)
    save_adapter(model, args.out)
    width = max(len(r.name) for r in report)
    print(f"{'layer':<{width}}  rank  energy kept  rel. error  |dW|_F")
    for r in report:
        print(f"{r.name:<{width}}  {r.rank:>4}  {r.energy:>11.4f}  {r.rel_error:>10.4f}  {r.delta_norm:.4g}")
    total = sum(r.delta_norm**2 for r in report)
    kept = sum(r.energy * r.delta_norm**2 for r in report)
    overall = kept / total if total > 0 else 1.0
    print(f"{len(report)} layers, rank {args.rank}: {overall:.4f} of the weight change's energy kept -> {args.out}")
    if args.report:
        text = json.dumps([r.as_dict() for r in report], indent=2) + "\n"
        replace_file(Path(args.report), lambda tmp: tmp.write_text(text))
    return 0
