"""Combine several LoRA adapters of one base model into one adapter folder.

    lorakit combine A B --out AB --method cat --weights 0.5,0.5

Methods (per adapted module, c_i = weight_i * alpha_i / r_i):
  cat     exact: ranks add up, B A = sum c_i B_i A_i
  svd     best rank-R approximation of sum c_i B_i A_i (--rank R, default the largest input rank)
  task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties (PEFT's ties_svd, dare_linear_svd,
          dare_ties_svd, magnitude_prune_svd are the same): PEFT's merge_utils maths on the dense
          updates dW_i = (alpha_i/r_i) B_i A_i with weights w_i, then truncated SVD to --rank R (as svd).
          --density keeps that fraction of each dW_i (magnitude: largest |values|; dare: random,
          rescaled by 1/density, reproducible with --seed); ties/dare_ties elect a sign per entry
          (--majority-sign-method total|frequency) and average the agreeing weighted updates.
          This is the dense definition, which PEFT's "<method>_svd" also computes; lorakit applies
          each input's own scaling (rsLoRA alpha/sqrt(r) included; cf. peft PR#3449) and never
          PEFT's factor-space shortcut (cross terms, peft#3004). The SVD residual (relative
          Frobenius error per module, max and mean) is printed and kept in the file's metadata.
          mergekit (0.1.5) on full fine-tuned models computes the same task_arithmetic, breadcrumbs
          with gamma 0 (= magnitude_prune), dare_linear with rescale false and lambda 1/density; its
          ties/dare_ties weigh the sign vote and divide by the agreeing weights (not their count), so
          they agree only for equal weights w (mergekit normalize true, lambda w; dare_ties also
          rescale false, lambda w/density). Figures and source lines: BENCHMARKS.md "vs mergekit".
  linear  PEFT's add_weighted_adapter "linear": A = sum sign(c_i) sqrt|c_i| A_i, B = sum sqrt|c_i| B_i
          (equal ranks; B A includes cross terms between adapters, so it is not the exact sum)
Weights default to an even mix (1/n each). The adapters must be for the same base and modules.
Classifier adapters each carry their own head (classifier, maybe pooler), which cannot be mixed:
--head-from A keeps input A's head (and its label names).
"""

from __future__ import annotations

import argparse

# lorakit.tools.combine.METHODS, spelled out so that `lorakit --help` need not import torch
METHOD_NAMES = (
    "linear", "cat", "svd", "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties",
    "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
)  # fmt: skip
HELP = "combine adapters into one: exact concatenation, SVD, TIES, DARE, magnitude pruning or PEFT's linear mix"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="*", help="adapter folders to combine (two or more)")
    parser.add_argument("--out", help="folder for the combined adapter")
    parser.add_argument("--method", choices=METHOD_NAMES, default="cat", help="how to combine (default: cat)")
    parser.add_argument("--weights", help="comma-separated weights, one per adapter (default: 1/n each)")
    parser.add_argument("--rank", type=int, help="target rank of the SVD methods (default: the largest input rank)")
    parser.add_argument("--density", type=float, default=1.0, help="ties/dare/magnitude_prune: fraction kept, (0, 1]")
    parser.add_argument(
        "--majority-sign-method", choices=["total", "frequency"], default="total", help="ties, dare_ties: sign election"
    )
    parser.add_argument("--seed", type=int, default=0, help="dare: seed of the random masks (same seed, same file)")
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
    from lorakit.tools.combine import MergeOptions, combine, combine_recipe

    require(args, "adapters", "out")
    adapters = list(args.adapters)  # nargs="*": a list from the command line and from --config alike
    if len(adapters) < 2:
        raise UsageError(f"combine needs two or more adapter folders, got {len(adapters)}")
    weights = parse_weights(args.weights, len(adapters))
    options = MergeOptions(
        rank=args.rank, density=args.density, majority_sign_method=args.majority_sign_method, seed=args.seed
    )
    out = combine(adapters, args.out, method=args.method, weights=weights, head_from=args.head_from, options=options)
    shown = ", ".join(f"{w:g}" for w in weights) if weights else "even"
    head = f", head from {args.head_from}" if args.head_from else ""
    print(f"combined {len(adapters)} adapters ({args.method}, weights {shown}{head}) -> {out}")
    residual = combine_recipe(out).get("svd_residual")
    if residual:
        print(
            f"SVD residual (relative Frobenius error per module): max {residual['max']:.3g}"
            f", mean {residual['mean']:.3g}"
        )
    return 0
