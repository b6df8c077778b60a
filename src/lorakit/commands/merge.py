"""Fold an adapter into its base model and write a standard Hugging Face folder.

The result (model weights, config, tokenizer) loads with plain `transformers`, no lorakit or
PEFT needed, and gives the same outputs as base + adapter. The command checks that: it writes
into a temporary folder, reloads that folder with plain transformers, and compares its outputs
on a probe batch with base + adapter's. The largest difference must be within RTOL of the
largest output (at least 1): 1e-4 for fp32 weights, 1e-2 for fp16 / bf16 ones. Only then is
the folder renamed into place; otherwise the command refuses (exit 2) and writes nothing.
A non-empty folder is only replaced with --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorakit.commands._common import add_model_arguments
from lorakit.errors import UsageError
from lorakit.files.atomic import recover_folder, replace_folder

RTOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
HELP = "merge an adapter into its base model: a plain Hugging Face folder with the same outputs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lorakit merge`."""
    add_model_arguments(
        parser,
        model_help="base model folder (Hugging Face format); default: the adapter's base (its card), else packaged",
        adapter_help="adapter folder (PEFT format: adapter_config.json + safetensors)",
    )
    parser.add_argument("--out", help="folder to write the merged model to (must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")


def run(args: argparse.Namespace) -> int:
    """Load base + adapter, merge, check, write atomically; print what was written."""
    from lorakit.cli import require
    from lorakit.commands._common import load_adapted
    from lorakit.core.adapters import merge_and_unload
    from lorakit.defaults import offline

    require(args, "adapter", "out")
    out = Path(args.out)
    recover_folder(out)  # an earlier merge killed mid-swap: put the old folder back first
    check_output_folder(out, args.overwrite, model_path=args.model)
    model, tokenizer, info = load_adapted(args.model, args.adapter, force=args.force)
    probe = _probe_inputs(model, tokenizer)
    with torch.inference_mode():
        want = _logits(model(**probe)).float()
        plain = merge_and_unload(model)
    checked: dict[str, float] = {}

    def write(folder: Path) -> None:
        _write_merged(folder, plain, tokenizer)
        checked.update(_check_written(folder, type(plain), probe, want, _dtype(plain)))

    offline()  # loading turned transformers' own progress bars back on
    replace_folder(out, write)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"merged {info['adapter']} into {info['model']} ({info['task']}): {out} ({size:.1f} MiB)")
    print(
        f"check: {out} reloaded with transformers vs base+adapter on a probe batch: "
        f"max |diff| of outputs = {checked['diff']:.2e} (limit {checked['limit']:.1e})"
    )
    if tokenizer is None:
        print("note: the base folder has no tokenizer, so none was copied")
    return 0


def check_output_folder(out: Path, overwrite: bool, model_path: str | None = None) -> None:
    """Refuse a file, a non-empty folder (without `overwrite`), or the base model's own folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder path")
    if model_path and out.exists() and out.resolve() == Path(model_path).resolve():
        raise UsageError(f"--out {out} is the base model's folder; write the merged model somewhere else")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; choose a new folder or pass --overwrite")


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _write_merged(folder: Path, plain: nn.Module, tokenizer: Any) -> None:
    plain.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _check_written(folder: Path, cls: type, probe: dict, want: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
    """Reload `folder` with plain transformers and compare its outputs with `want` (base + adapter)."""
    try:
        from lorakit import hf

        reloaded = hf.load_pretrained(folder, cls, dtype=dtype).eval()
        with torch.inference_mode():
            got = _logits(reloaded(**probe)).float()
    except Exception as err:  # noqa: BLE001 - whatever broke, the folder is not a usable model
        raise UsageError(f"the merged folder does not load with transformers ({type(err).__name__}: {err})") from None
    limit = RTOL.get(dtype, 1e-2) * max(1.0, want.abs().max().item())
    diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    if not diff <= limit:
        raise UsageError(
            f"the merged model's outputs differ from base + adapter by {diff:.2e} (limit {limit:.1e}); "
            "nothing was written (check the adapter fits this base, or report a bug)"
        )
    return {"diff": diff, "limit": limit}


def _probe_inputs(model: nn.Module, tokenizer: Any) -> dict[str, torch.Tensor]:
    if tokenizer is not None:
        texts = ["lorakit checks the merged model", "a second, longer sentence to check padding too"]
        if getattr(tokenizer, "pad_token", None) is None:
            return dict(tokenizer(texts[:1], return_tensors="pt"))
        return dict(tokenizer(texts, padding=True, return_tensors="pt"))
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    return {"input_ids": torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))}


def _logits(output: Any) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
