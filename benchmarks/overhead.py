"""lorakit vs PEFT vs the plain base model: latency, training step, peak memory, adapter size.

MiniLM (all-MiniLM-L6-v2) as a sequence classifier, batch 16 x 128 tokens, LoRA r=8,
alpha=16, no LoRA dropout, on query and value, classifier head trained in full.

    python benchmarks/overhead.py                  # full run, 15 repeats per variant
    python benchmarks/overhead.py --quick          # smoke run (numbers are not meaningful)
    python benchmarks/overhead.py --device cpu --repeats 30 --out results.json

Timings are medians over rounds in which every variant runs once (round-robin), so slow
drift of the machine (other processes, thermal state) hits all variants alike. Peak
memory is measured in a fresh child process per mode, because a process's peak RSS (and
CUDA's caching allocator) never goes down and would mix the modes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in a package; never reach a hub

import peft  # imported by every child too, so import size does not skew the memory numbers
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lorakit
from lorakit.defaults import default_model_path

BATCH, SEQ_LEN, THREADS = 16, 128, 2
R, ALPHA, TARGETS, HEAD = 8, 16, ["query", "value"], ["classifier"]
INFERENCE = ["base", "lorakit", "lorakit-merged", "peft", "peft-merged"]
# "floor": no LoRA, but the outputs of the targeted modules require grad, so the backward
# runs exactly where a LoRA on them must run: the gap between a LoRA mode and the floor is
# what that implementation's LoRA branch costs.
TRAINING = ["lorakit", "peft", "full", "floor"]
DROPOUT = {"dropout": True, "no-dropout": False}  # the model's own dropout; LoRA dropout is always 0
# (name, measured key, reference key, limit): key / reference must stay <= limit.
TARGETS_SET = [
    ("lorakit unmerged forward vs base", "infer:lorakit", "infer:base", 1.03),
    ("lorakit merged forward vs base", "infer:lorakit-merged", "infer:base", 1.01),
    *[(f"lorakit train step vs PEFT ({d})", f"train:lorakit:{d}", f"train:peft:{d}", 0.95) for d in DROPOUT],
    *[(f"lorakit train memory vs PEFT ({d})", f"mem:train:lorakit:{d}", f"mem:train:peft:{d}", 1.0) for d in DROPOUT],
]


# --- models and data ------------------------------------------------------------------------
MODEL_PATH: Path | None = None  # set in main: --model, else the packaged MiniLM


def load_base(dropout: bool, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the fresh classifier head starts identical in every variant
    no_dropout = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = AutoModelForSequenceClassification.from_pretrained(
        MODEL_PATH, num_labels=2, dtype=torch.float32, **no_dropout
    )
    return model.to(device)


def build(variant: str, device: torch.device, dropout: bool = True) -> torch.nn.Module:
    """One model variant: base, lorakit[-merged], peft[-merged] or full (all trainable)."""
    model = load_base(dropout, device)
    if variant.startswith("lorakit"):
        config = lorakit.LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=TARGETS, modules_to_save=HEAD)
        lorakit.inject(model, config)
        if variant == "lorakit-merged":
            lorakit.merge(model)
    elif variant.startswith("peft"):
        config = peft.LoraConfig(
            r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=HEAD, task_type="SEQ_CLS"
        )
        model = peft.get_peft_model(model, config)
        if variant == "peft-merged":
            model.merge_adapter()
    elif variant == "base":
        model.requires_grad_(False)
    elif variant == "floor":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        for name, module in model.named_modules():
            if name.split(".")[-1] in TARGETS:
                module.register_forward_hook(mark_output_for_backward)
    return model  # "full": from_pretrained leaves every parameter trainable


def mark_output_for_backward(module: torch.nn.Module, args, out: torch.Tensor) -> None:
    if module.training and not out.requires_grad:
        out.requires_grad_(True)


def make_batch(device: torch.device) -> dict[str, torch.Tensor]:
    """Random word-piece ids framed by [CLS] ... [SEP], no padding: every token costs."""
    tok = AutoTokenizer.from_pretrained(MODEL_PATH)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, tok.vocab_size, (BATCH, SEQ_LEN), generator=gen)
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    labels = torch.randint(0, 2, (BATCH,), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


# --- the measured work ------------------------------------------------------------------------
def forward_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(**inputs)

    return run


def train_step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # CUDA calls return before the work is done


def time_round_robin(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device) -> dict:
    """Median milliseconds per variant; each round runs every variant once, in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        # Rotate the order each round so no variant always runs right after the same one
        # (a heavy step leaves caches and the allocator in a state the next one pays for).
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            fn = fns[name]
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: {"median_ms": statistics.median(s), "samples_ms": s} for name, s in samples.items()}


# --- peak memory, one child process per mode ---------------------------------------------------
def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one_mode(mode: str, device: torch.device) -> None:
    """Child side: run mode "infer:VARIANT" or "train:VARIANT:DROPOUT" a few times, print peak."""
    kind, variant, *rest = mode.split(":")
    if kind == "infer":
        fn = forward_fn(build(variant, device), make_batch(device))
    else:
        fn = train_step_fn(build(variant, device, DROPOUT[rest[0]]), make_batch(device))
    for _ in range(3):  # step 1 allocates AdamW's state; later steps show the steady peak
        fn()
    sync(device)
    print(json.dumps({"mode": mode, "peak_mib": peak_mib(device)}))


def measure_peaks(modes: list[str], device: torch.device) -> dict[str, float]:
    peaks = {}
    for mode in modes:
        cmd = [sys.executable, __file__, "--device", device.type, "--model", str(MODEL_PATH), "--one-mode", mode]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"memory child for {mode} failed:\n{done.stderr}")
        peaks[f"mem:{mode}"] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]
    return peaks


# --- parameters and adapter files --------------------------------------------------------------
def size_report(device: torch.device) -> dict:
    ours, theirs = build("lorakit", device), build("peft", device)
    peft_trainable, peft_total = theirs.get_nb_trainable_parameters()
    report = lorakit.parameter_report(ours)
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(ours, Path(tmp) / "lorakit")
        theirs.save_pretrained(Path(tmp) / "peft")
        sizes = {name: (Path(tmp) / name / "adapter_model.safetensors").stat().st_size for name in ("lorakit", "peft")}
    return {
        "trainable": {"lorakit": report["trainable"], "peft": peft_trainable},
        "total": {"lorakit": report["total"], "peft": peft_total},
        "adapter_bytes": sizes,
    }


# --- reporting ------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lorakit": lorakit.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "device": device.type,
        "device_name": name,
    }


def paired_ratio(values: dict, samples: dict, key: str, ref: str) -> float:
    """key / ref: the median of per-round ratios for timings (both ran in the same round, so
    the machine's drift cancels), the plain ratio for single values such as peak memory."""
    if key in samples and ref in samples:
        return statistics.median(a / b for a, b in zip(samples[key], samples[ref], strict=True))
    return values[key] / values[ref]


def ratios(values: dict, samples: dict) -> dict[str, float]:
    out = {f"infer:{n}/base": paired_ratio(values, samples, f"infer:{n}", "infer:base") for n in INFERENCE}
    for d in DROPOUT:
        out[f"train:lorakit/peft:{d}"] = paired_ratio(values, samples, f"train:lorakit:{d}", f"train:peft:{d}")
        for t in ("lorakit", "peft"):
            out[f"train:{t}/full:{d}"] = paired_ratio(values, samples, f"train:{t}:{d}", f"train:full:{d}")
            # What the LoRA branch itself costs: the step minus the floor's, round by round.
            pairs = zip(samples[f"train:{t}:{d}"], samples[f"train:floor:{d}"], strict=True)
            out[f"train:{t}-floor_ms:{d}"] = statistics.median(a - b for a, b in pairs)
    return out


def check_targets(values: dict, samples: dict) -> list[dict]:
    rows = []
    for name, key, ref, limit in TARGETS_SET:
        if key in values and ref in values:
            ratio = paired_ratio(values, samples, key, ref)
            rows.append({"target": name, "ratio": ratio, "limit": limit, "pass": ratio <= limit})
    return rows


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    v, env, q = result["values"], result["environment"], result["ratios"]
    infer = [[n, f"{v['infer:' + n]:.2f}", f"{q[f'infer:{n}/base']:.3f}x"] for n in INFERENCE]
    train = []
    for d in DROPOUT:
        for t in TRAINING:
            vs_peft = f"{q[f'train:lorakit/peft:{d}']:.3f}x" if t == "lorakit" else ""
            vs_full = f"{q[f'train:{t}/full:{d}']:.3f}x" if t in ("lorakit", "peft") else ""
            branch = f"{q[f'train:{t}-floor_ms:{d}']:.1f}" if t in ("lorakit", "peft") else ""
            train.append([t, d, f"{v[f'train:{t}:{d}']:.2f}", vs_peft, vs_full, branch])
    mem = [[k.removeprefix("mem:"), f"{m:.0f}"] for k, m in v.items() if k.startswith("mem:")]
    s = result["sizes"]
    sizes = [[what, s[what]["lorakit"], s[what]["peft"]] for what in ("trainable", "total", "adapter_bytes")]
    targets = [
        [t["target"], f"{t['ratio']:.3f}", f"<= {t['limit']}", "pass" if t["pass"] else "MISS"]
        for t in result["targets"]
    ]
    return "\n\n".join(
        [
            f"## lorakit overhead on {env['device_name']} ({env['device']}, {env['threads']} threads, "
            f"torch {env['torch']}, {result['settings']['repeats']} repeats, load avg {result['load_average']})"
            + (" -- QUICK SMOKE RUN, numbers not meaningful" if result["settings"]["quick"] else ""),
            "Ratios are medians of per-round ratios (each round runs every variant once, in turn).",
            "### Inference forward (batch 16 x 128)\n" + md_table(["variant", "median ms", "vs base"], infer),
            "### Training step\n"
            + md_table(
                ["mode", "model dropout", "median ms", "vs PEFT", "vs full", "LoRA branch ms (vs floor)"], train
            ),
            f"### Peak memory, {result['settings']['peak_memory']}, own process per mode\n"
            + md_table(["mode", "peak MiB"], mem),
            "### Parameters and adapter file\n" + md_table(["", "lorakit", "PEFT"], sizes),
            "### Targets\n" + md_table(["target", "ratio", "limit", "result"], targets),
        ]
    )


# --- main ------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per variant (default 15, >= 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, 1 warm-up")
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/overhead-<device>.json)")
    parser.add_argument("--model", type=Path, help="base model folder (default: the packaged MiniLM)")
    parser.add_argument("--one-mode", help=argparse.SUPPRESS)  # child process of measure_peaks
    args = parser.parse_args()
    if args.repeats < 10 and not args.quick:
        parser.error("--repeats must be >= 10 for a median worth reporting (use --quick for a smoke run)")
    return args


def main() -> None:
    global MODEL_PATH
    args = parse_args()
    MODEL_PATH = args.model or default_model_path()
    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls deprecated transformers APIs
    device = torch.device(args.device)
    if args.one_mode:
        return run_one_mode(args.one_mode, device)
    repeats, warmup = (3, 1) if args.quick else (args.repeats, args.warmup)
    load_before = os.getloadavg()[0]
    # Children first: Linux carries the parent's peak RSS into a child's ru_maxrss across
    # fork/exec, so the parent must not have loaded any model yet when it spawns them.
    modes = [f"infer:{n}" for n in INFERENCE] + [f"train:{t}:{d}" for t in TRAINING for d in DROPOUT]
    values = measure_peaks(modes, device)
    batch = make_batch(device)

    models = {n: build(n, device) for n in INFERENCE}
    infer = time_round_robin({n: forward_fn(m, batch) for n, m in models.items()}, repeats, warmup, device)
    del models
    steps = {f"{t}:{d}": train_step_fn(build(t, device, on), batch) for t in TRAINING for d, on in DROPOUT.items()}
    train = time_round_robin(steps, repeats, warmup, device)
    del steps

    values |= {f"infer:{n}": r["median_ms"] for n, r in infer.items()}
    values |= {f"train:{n}": r["median_ms"] for n, r in train.items()}
    samples = {
        **{f"infer:{n}": r["samples_ms"] for n, r in infer.items()},
        **{f"train:{n}": r["samples_ms"] for n, r in train.items()},
    }
    result = {
        "environment": environment(device),
        "settings": {
            "batch": BATCH,
            "seq_len": SEQ_LEN,
            "r": R,
            "alpha": ALPHA,
            "targets": TARGETS,
            "repeats": repeats,
            "warmup": warmup,
            "quick": args.quick,
            "peak_memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss (RSS)",
        },
        "load_average": f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}",
        "values": values,
        "ratios": ratios(values, samples),
        "sizes": size_report(device),
        "samples_ms": samples,
    }
    result["targets"] = check_targets(values, samples)
    out = args.out or Path(__file__).parent / "results" / f"overhead-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
