"""Combine several LoRA adapters of one base model into one adapter folder.

    lorakit combine A B --out AB --method cat --weights 0.5,0.5

Methods (per adapted module, c_i = weight_i * alpha_i / r_i):
  cat     exact: ranks add up, B A = sum c_i B_i A_i
  svd     best rank-R approximation of sum c_i B_i A_i (--rank R, default the largest input rank)
  linear  PEFT's add_weighted_adapter "linear": A = sum sign(c_i) sqrt|c_i| A_i, B = sum sqrt|c_i| B_i
          (equal ranks; B A includes cross terms between adapters, so it is not the exact sum)
Weights default to an even mix (1/n each). The adapters must be for the same base and modules.
Classifier adapters each carry their own head (classifier, maybe pooler), which cannot be mixed:
--head-from A keeps input A's head (and its label names).
"""

from __future__ import annotations

import argparse

HELP = "combine adapters into one: weighted linear mix, exact concatenation, or SVD re-compression"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="*", help="adapter folders to combine (two or more)")
    parser.add_argument("--out", help="folder for the combined adapter")
    parser.add_argument(
        "--method", choices=["linear", "cat", "svd"], default="cat", help="how to combine (default: cat)"
    )
    parser.add_argument("--weights", help="comma-separated weights, one per adapter (default: 1/n each)")
    parser.add_argument("--rank", type=int, help="target rank for --method svd (default: the largest input rank)")
    parser.add_argument(
        "--head-from", metavar="NAME", help="classifier adapters: the input (path or folder name) whose head to keep"
    )


def parse_weights(text: str | None, count: int) -> list[float] | None:
    """'0.5,0.5' -> [0.5, 0.5]; None -> None (even mix)."""
    from lorakit.errors import UsageError

    if text is None or str(text).strip() == "":
        return None
    items = str(text).split(",")  # cli.py turns a --config value into the flag's text, never a list
    try:
        weights = [float(w) for w in items]
    except ValueError:
        raise UsageError(f"--weights {text!r}: give numbers separated by commas, e.g. 0.5,0.5") from None
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values for {count} adapters: give one weight per adapter")
    return weights


def run(args: argparse.Namespace) -> int:
    from lorakit.cli import require
    from lorakit.errors import UsageError
    from lorakit.tools.combine import combine

    require(args, "adapters", "out")
    adapters = list(args.adapters)  # nargs="*": a list from the command line and from --config alike
    if len(adapters) < 2:
        raise UsageError(f"combine needs two or more adapter folders, got {len(adapters)}")
    weights = parse_weights(args.weights, len(adapters))
    out = combine(adapters, args.out, method=args.method, weights=weights, rank=args.rank, head_from=args.head_from)
    shown = ", ".join(f"{w:g}" for w in weights) if weights else "even"
    head = f", head from {args.head_from}" if args.head_from else ""
    print(f"combined {len(adapters)} adapters ({args.method}, weights {shown}{head}) -> {out}")
    return 0
