"""The `lorakit` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA adapters for PyTorch and Hugging Face models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="inject, train a few steps, save, load, merge and check the packaged MiniLM")
    demo.add_argument("--out", default="runs/demo", help="folder for the demo adapter (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    args = parser.parse_args(argv)
    if args.version:
        from lorakit import __version__

        print(__version__)
        return 0
    if args.command == "demo":
        from lorakit.demo import run_demo

        try:
            return run_demo(args.out, steps=args.steps)
        except (ValueError, OSError) as err:
            print(f"lorakit demo: error: {err}", file=sys.stderr)
            return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
