"""Fine-tune the packaged MiniLM with LoRA on the built-in demo data, evaluate, save, merge, check.

This is what `make demo` runs. It needs no download and no arguments. The data set is 300
hand-written sentences about five topics (sports, food, weather, technology, money): 240 to
train on and 60 held out, in lorakit/data/demo/. The report shows held-out accuracy and
macro-F1 before and after training and checks that the saved adapter, the merged model and
the merged folder read back by plain transformers (and PEFT, when installed) give the same
logits. Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse

HELP = "the end-to-end demo on the packaged MiniLM (what `make demo` runs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lorakit demo`."""
    parser.add_argument("--out", default="runs/demo", help="folder for the demo's outputs (default: runs/demo)")
    parser.add_argument("--epochs", type=float, default=5.0, help="passes over the 240 training sentences (default: 5)")
    parser.add_argument("--steps", type=int, help="optimizer steps instead of --epochs (batch of 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh head, LoRA init and batches")


def run(args: argparse.Namespace) -> int:
    """Run the demo and return its exit code."""
    from lorakit.end_to_end_demo import run_demo
    from lorakit.errors import UsageError

    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be at least 1")
    if args.epochs <= 0:
        raise UsageError(f"--epochs {args.epochs}: must be positive")
    return run_demo(args.out, steps=args.steps, epochs=args.epochs, seed=args.seed)
