"""LoRA variants (issue 6) benchmarked side by side: lorakit vs PEFT vs plain LoRA.

    python benchmarks/variants.py --section dora            # DoRA training step and peak memory
    python benchmarks/variants.py --section dora --quick    # smoke run (numbers not meaningful)
    python benchmarks/variants.py --section dora --targets all-linear --repeats 10

dora: MiniLM (the packaged all-MiniLM-L6-v2) as a sequence classifier, batch 32 x 64 tokens,
r=8, alpha=16, no LoRA dropout, on query/value (default) or every linear layer; the classifier
trains in full, AdamW. One training step (forward, backward, optimizer) per variant per round,
in a rotating order; medians over rounds and the median of per-round ratios. Variants: lorakit
DoRA, PEFT DoRA (loaded from lorakit's file, so both start from identical weights; the outputs
are checked equal first), lorakit plain LoRA, PEFT plain LoRA. Memory: the tensors autograd
saves for the backward in one step (and on CUDA the allocator's step peak). Results:
benchmarks/results/variants-<section>-<device>.json. The same four variants are also timed as
one adapted layer alone (MiniLM's 384x384 and 384x1536 shapes, 2048 tokens, forward + backward
with x's gradient, against the frozen base layer): a whole step is mostly the base model's
work, the single layer shows what each DoRA implementation itself costs.

Other sections (QLoRA, extraction) live in benchmarks/variants_tools.py; add one here as a
`bench_<name>(args) -> dict` function and a SECTIONS entry.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402  (imported in every child alike, so memory numbers compare)
import torch  # noqa: E402
import transformers  # noqa: E402
from overhead import sync, train_step_fn  # noqa: E402  (the same step and timer sync as overhead.py)
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

import lorakit  # noqa: E402
from lorakit.defaults import default_model_path, offline  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCH, SEQ_LEN, R, ALPHA = 32, 64, 8, 16
DORA_VARIANTS = ["lorakit-dora", "peft-dora", "lorakit-lora", "peft-lora"]


# --- shared helpers -------------------------------------------------------------------------
def time_round_robin(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device) -> dict:
    """Per-variant millisecond samples; every round runs each variant once, order rotating."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names, samples = list(fns), {name: [] for name in fns}
    for round_ in tqdm(range(repeats), desc="rounds", leave=False):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1000)
    return samples


def paired_ratio(samples: dict[str, list[float]], key: str, ref: str) -> float:
    """Median over rounds of key / ref measured in the same round (robust to machine drift)."""
    return statistics.median(a / b for a, b in zip(samples[key], samples[ref], strict=True))


def environment(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


# --- DoRA -------------------------------------------------------------------------------------
def _targets(args: argparse.Namespace) -> list[str] | str:
    return "all-linear" if args.targets == "all-linear" else args.targets.split(",")


def _base(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the fresh classifier head starts identical in every variant
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    return model.to(device)


def _lorakit_model(args: argparse.Namespace, device: torch.device, dora: bool) -> torch.nn.Module:
    config = lorakit.LoraConfig(
        r=R, alpha=ALPHA, target_modules=_targets(args), use_dora=dora, modules_to_save=["classifier"]
    )
    model = lorakit.inject(_base(device), config)
    with torch.no_grad():  # a trained-looking adapter: B != 0 so DoRA's norms are not trivial
        gen = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    return model


def build_dora_variant(variant: str, args: argparse.Namespace, device: torch.device, tmp: Path) -> torch.nn.Module:
    """lorakit-dora / lorakit-lora, or PEFT's model loaded from lorakit's file of the same kind."""
    library, kind = variant.split("-")
    ours = _lorakit_model(args, device, kind == "dora")
    if library == "lorakit":
        return ours
    folder = tmp / kind
    if not folder.exists():
        lorakit.save_adapter(ours, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(_base(device), str(folder), is_trainable=True)


def make_batch(device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (BATCH, SEQ_LEN), generator=gen)
    labels = torch.randint(0, 2, (BATCH,), generator=gen)
    return {k: v.to(device) for k, v in {"input_ids": ids, "labels": labels}.items()}


def _check_same_outputs(models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest logit difference lorakit vs PEFT per kind, in eval mode (no dropout)."""
    diffs = {}
    with torch.no_grad():
        for kind in ("dora", "lora"):
            ours, theirs = models[f"lorakit-{kind}"].eval(), models[f"peft-{kind}"].eval()
            ids = batch["input_ids"]
            diffs[kind] = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    return diffs


def step_memory_mib(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict:
    """Memory of one training step: the tensors autograd keeps for the backward (unique
    storages, the part an implementation controls) and, on CUDA, the allocator's peak above
    what was held before the step. A process's peak RSS says nothing here: loading the model
    and the libraries dominates it, and it read the same for every variant."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    sync(device)
    result = {"saved_for_backward_mib": sum(storages.values()) / 2**20}
    if device.type == "cuda":
        result["cuda_step_peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    model.zero_grad(set_to_none=True)
    return result


LAYER_SHAPES = [(384, 384), (384, 1536)]  # MiniLM's attention projections and FFN up-projection


def _layer_step(library: str, dora: bool, d_in: int, d_out: int, x: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of one adapted linear layer (x needs its gradient, as inside a model)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out)).to(x.device)
    if library == "lorakit":
        lorakit.inject(model, lorakit.LoraConfig(r=R, alpha=ALPHA, target_modules=["0"], use_dora=dora))
    elif library == "peft":
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], use_dora=dora))
    else:
        model.requires_grad_(False)  # the floor: the base layer's forward and x's gradient only
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    model.train()
    weight = torch.randn(x.shape[0], d_out, device=x.device)

    def run() -> None:
        (model(x) * weight).sum().backward()

    return run


def _layer_timings(args: argparse.Namespace, device: torch.device) -> dict:
    """One DoRA / LoRA layer alone, MiniLM sizes, BATCH * SEQ_LEN tokens: the implementation's own cost."""
    out = {}
    for d_in, d_out in LAYER_SHAPES:
        x = torch.randn(BATCH * SEQ_LEN, d_in, device=device, requires_grad=True)
        fns = {
            f"{library}-{kind}": _layer_step(library, kind == "dora", d_in, d_out, x)
            for library in ("lorakit", "peft")
            for kind in ("dora", "lora")
        }
        fns["base"] = _layer_step("base", False, d_in, d_out, x)
        samples = time_round_robin(fns, args.repeats * 3, args.warmup, device)
        out[f"{d_in}x{d_out}"] = {
            "median_ms": {v: statistics.median(s) for v, s in samples.items()},
            "lorakit-dora / peft-dora (time)": paired_ratio(samples, "lorakit-dora", "peft-dora"),
            "lorakit-dora / base (time)": paired_ratio(samples, "lorakit-dora", "base"),
            "peft-dora / base (time)": paired_ratio(samples, "peft-dora", "base"),
            "lorakit-lora / peft-lora (time)": paired_ratio(samples, "lorakit-lora", "peft-lora"),
        }
    return out


def bench_dora(args: argparse.Namespace) -> dict:
    """DoRA training step time and memory: lorakit vs PEFT, and vs plain LoRA."""
    device = torch.device(args.device)
    batch = make_batch(device)
    with tempfile.TemporaryDirectory() as tmp:
        models = {v: build_dora_variant(v, args, device, Path(tmp)) for v in DORA_VARIANTS}
    max_diff = _check_same_outputs(models, batch)
    memory = {v: step_memory_mib(m, batch, device) for v, m in models.items()}
    samples = time_round_robin(
        {v: train_step_fn(m, batch) for v, m in models.items()}, args.repeats, args.warmup, device
    )
    saved = {v: m["saved_for_backward_mib"] for v, m in memory.items()}
    del models
    layers = _layer_timings(args, device)
    return {
        "section": "dora",
        "setup": {"batch": BATCH, "seq_len": SEQ_LEN, "r": R, "alpha": ALPHA, "targets": args.targets},
        "max_logit_diff_lorakit_vs_peft": max_diff,
        "median_ms": {v: statistics.median(s) for v, s in samples.items()},
        "samples_ms": samples,
        "memory_mib": memory,
        "ratios": {
            "lorakit-dora / peft-dora (time)": paired_ratio(samples, "lorakit-dora", "peft-dora"),
            "lorakit-dora / lorakit-lora (time)": paired_ratio(samples, "lorakit-dora", "lorakit-lora"),
            "peft-dora / peft-lora (time)": paired_ratio(samples, "peft-dora", "peft-lora"),
            "lorakit-lora / peft-lora (time)": paired_ratio(samples, "lorakit-lora", "peft-lora"),
            "lorakit-dora / peft-dora (saved for backward)": saved["lorakit-dora"] / saved["peft-dora"],
        },
        "single_layer": layers,
    }


SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {"dora": bench_dora}


def markdown(result: dict) -> str:
    lines = [f"### {result['section']} ({result['environment']['device']}, {result['environment']['threads']} threads)"]
    lines += ["", "| variant | median ms / step | saved for backward MiB | CUDA step peak MiB |", "|---|---|---|---|"]
    for v, ms in result["median_ms"].items():
        mem = result["memory_mib"][v]
        cuda = f"{mem['cuda_step_peak_mib']:.0f}" if "cuda_step_peak_mib" in mem else "-"
        lines.append(f"| {v} | {ms:.1f} | {mem['saved_for_backward_mib']:.0f} | {cuda} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    for shape, layer in result.get("single_layer", {}).items():
        lines += ["", f"single layer {shape}, {BATCH * SEQ_LEN} tokens, forward + backward:", ""]
        lines += ["| variant | median ms |", "|---|---|"]
        lines += [f"| {v} | {ms:.2f} |" for v, ms in layer["median_ms"].items()]
        lines += [f"| {k} | {v:.3f} |" for k, v in layer.items() if k != "median_ms"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=sorted(SECTIONS), default="dora")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--targets", default="query,value", help="comma-separated suffixes or all-linear")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, 1 warm-up")
    parser.add_argument(
        "--out", type=Path, help="JSON path (default benchmarks/results/variants-<section>-<device>.json)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 2, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    offline()
    torch.set_num_threads(args.threads)
    result = SECTIONS[args.section](args)
    result["environment"] = environment(torch.device(args.device))
    result["command"] = " ".join(["python", "benchmarks/variants.py", *(argv if argv is not None else sys.argv[1:])])
    out = args.out or RESULTS / f"variants-{args.section}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
