"""Fine-tune the packaged MiniLM with LoRA on the built-in demo data, evaluate, save, merge, check.

This is what `make demo` runs. It needs no download and no arguments.
"""

from __future__ import annotations

import argparse

HELP = "the end-to-end demo on the packaged MiniLM (what `make demo` runs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for the demo's outputs (default: runs/demo)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")


def run(args: argparse.Namespace) -> int:
    from lorakit.demo import run_demo

    return run_demo(args.out, steps=args.steps)
