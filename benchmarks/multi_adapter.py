"""Mixed-adapter batches, model level: lorakit's batched path vs PEFT's mixed batch vs
merging one adapter at a time, beside the plain base model, in one run.

(i)  classifier forward: MiniLM (all-MiniLM-L6-v2), a 32 x 64-token batch whose rows use
     K = 1, 4, 16, 32 distinct adapters (row i on adapter i % K), LoRA on query and value,
     adapters of rank 8 ("r8") and of mixed ranks 4, 8, 16, 32 ("mixed"); examples/s.
(ii) decoding: a causal LM (default: a small random Llama config; `--model PATH` for a real
     one) with LoRA on every linear layer, 32 sequences, greedy, exactly 32 new tokens each,
     K = 1 and 32 adapters; tokens/s.

Variants: `plain` (the base model, no adapters), `lorakit` (MultiLoraModel: stacked slots,
one gathered bmm per layer), `peft` (PeftModel with `adapter_names=[...]`), `merge-seq`
(for each distinct adapter in the batch: merge it, run its rows, unmerge; lorakit's merge).

    python benchmarks/multi_adapter.py                 # full run (7 repeats)
    python benchmarks/multi_adapter.py --quick         # 3 repeats, fewer decoding rounds
    python benchmarks/multi_adapter.py --device cuda --dtype float16

Timings are medians over rounds in which every variant at every K runs once (order rotated
each round, so a busy machine's drift hits all alike); ratios are ratios of those medians.
Results go to benchmarks/results/multi_adapter-<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models ship locally; never reach a hub

import peft
import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.defaults import default_model_path, offline
from lorakit.serve import MultiLoraModel

ROWS, SEQ_LEN, NEW_TOKENS, PROMPT_LEN = 32, 64, 32, 16
KS_CLS, KS_GEN = [1, 4, 16, 32], [1, 32]
RANK_SETS = {"r8": [8], "mixed": [4, 8, 16, 32]}
VARIANTS = ["plain", "lorakit", "peft", "merge-seq"]


# --- adapters ---------------------------------------------------------------------------------
def make_adapters(base: torch.nn.Module, ranks: list[int], count: int, targets, folder: Path) -> list[str]:
    """`count` adapters with random non-zero B, rank ranks[i % len(ranks)], saved in PEFT's format."""
    paths = []
    for i in tqdm(range(count), desc=f"adapters r={ranks}", leave=False):
        model = copy.deepcopy(base)
        r = ranks[i % len(ranks)]
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=targets))
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                for B in layer.lora_B.values():
                    B.normal_(0, 0.02)
        paths.append(str(lorakit.save_adapter(model, folder / f"a{i}")))
    return paths


def build_variants(base, paths: list[str], targets, device, dtype) -> dict[str, object]:
    """The four variants over copies of `base`, each holding every adapter in `paths`."""
    names = [f"a{i}" for i in range(len(paths))]
    multi = MultiLoraModel(copy.deepcopy(base), slots=len(paths), max_rank=32, target_modules=targets)
    for name, path in zip(names, paths, strict=True):
        multi.load(name, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name=names[0])
        for name, path in zip(names[1:], paths[1:], strict=True):
            peft_model.load_adapter(path, adapter_name=name)
    merged = copy.deepcopy(base)
    for name, path in zip(names, paths, strict=True):
        lorakit.load_adapter(merged, path, name)
    out = {"plain": base, "lorakit": multi, "peft": peft_model, "merge-seq": merged}
    for key in ("plain", "peft", "merge-seq"):
        out[key] = out[key].to(device=device, dtype=dtype).eval()
    multi.model.to(device=device, dtype=dtype).eval()
    return out


@contextlib.contextmanager
def merged_into(model, name: str):
    """Adapter `name` merged into the base weights within the block (lorakit merge/unmerge)."""
    lorakit.set_adapter(model, name)
    lorakit.merge(model)
    try:
        yield
    finally:
        lorakit.unmerge(model)


# --- the measured calls -----------------------------------------------------------------------
def classify_call(variant: str, models: dict, batch: dict, rows: list[str]) -> Callable[[], object]:
    if variant == "plain":
        return lambda: models["plain"](**batch).logits
    if variant == "lorakit":
        multi = models["lorakit"]

        def run():
            with multi.use(rows):
                return multi.model(**batch).logits

        return run
    if variant == "peft":
        return lambda: models["peft"](**batch, adapter_names=rows).logits
    return lambda: merge_sequential(models["merge-seq"], rows, lambda m, idx: m(**_rows(batch, idx)).logits)


def generate_call(variant: str, models: dict, batch: dict, rows: list[str]) -> Callable[[], object]:
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    if variant == "plain":
        return lambda: models["plain"].generate(**batch, **settings)
    if variant == "lorakit":
        multi = models["lorakit"]

        def run():
            with multi.use(rows):
                return multi.model.generate(**batch, **settings)

        return run
    if variant == "peft":
        return lambda: models["peft"].generate(**batch, adapter_names=rows, **settings)
    return lambda: merge_sequential(
        models["merge-seq"], rows, lambda m, idx: m.generate(**_rows(batch, idx), **settings)
    )


def merge_sequential(model, rows: list[str], step) -> list:
    """Serve one adapter at a time: merge it, run the rows that use it, unmerge."""
    outputs = []
    for name in dict.fromkeys(rows):
        index = [i for i, r in enumerate(rows) if r == name]
        with merged_into(model, name):
            outputs.append(step(model, index))
    return outputs


def _rows(batch: dict, index: list[int]) -> dict:
    return {k: v[index] for k, v in batch.items()}


def measure(calls: dict[str, Callable[[], object]], repeats: int, device: torch.device, desc: str) -> dict:
    """Median seconds per call of each variant, over `repeats` rounds of all variants (rotated order)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    with torch.no_grad():
        for fn in calls.values():  # warm-up: caches, allocator, lazy init
            fn()
        for round_ in tqdm(range(repeats), desc=desc, leave=False):
            order = keys[round_ % len(keys) :] + keys[: round_ % len(keys)]
            for key in order:
                sync()
                start = time.perf_counter()
                calls[key]()
                sync()
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def sweep(models: dict, batch: dict, ks: list[int], make_call, repeats: int, device, desc: str, work: int = ROWS):
    """Every variant at every K, measured in one interleaved set of rounds (so drift of a busy
    machine hits all alike); the plain model runs once per round. Returns {"K=k": row}."""
    rows_of = {k: [f"a{i % k}" for i in range(ROWS)] for k in ks}
    calls = {"plain": make_call("plain", models, batch, rows_of[ks[0]])}
    for k in ks:
        calls.update({f"{v}:K={k}": make_call(v, models, batch, rows_of[k]) for v in VARIANTS if v != "plain"})
    seconds = measure(calls, repeats, device, desc)
    out = {}
    for k in ks:
        per_s = {v: work / seconds["plain" if v == "plain" else f"{v}:K={k}"] for v in VARIANTS}
        out[f"K={k}"] = {"per_s": per_s, "max_abs_diff_lorakit_vs_peft": check_agreement(models, batch, rows_of[k])}
    return out


def check_agreement(models: dict, batch: dict, rows: list[str]) -> float:
    """Max |lorakit - PEFT| over the mixed batch's logits: both must compute the same thing."""
    with torch.no_grad():
        with models["lorakit"].use(rows):
            ours = models["lorakit"].model(**batch).logits
        theirs = models["peft"](**batch, adapter_names=rows).logits
    return (ours.float() - theirs.float()).abs().max().item()


# --- the two parts ----------------------------------------------------------------------------
def part_classifier(args, device, dtype, folder: Path) -> dict:
    offline()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(args.classifier, num_labels=2).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, base.config.vocab_size, (ROWS, SEQ_LEN), generator=generator)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    results = {}
    for set_name, ranks in RANK_SETS.items():
        paths = make_adapters(base, ranks, max(KS_CLS), ["query", "value"], folder / f"cls-{set_name}")
        models = build_variants(copy.deepcopy(base), paths, ["query", "value"], device, dtype)
        found = sweep(models, batch, KS_CLS, classify_call, args.repeats, device, f"classifier {set_name}")
        results.update({f"{set_name}:{key}": {"examples_per_s": row.pop("per_s"), **row} for key, row in found.items()})
    return results


def part_decoding(args, device, dtype, folder: Path) -> dict:
    torch.manual_seed(0)
    if args.model:
        base = AutoModelForCausalLM.from_pretrained(args.model).eval()
    else:  # a small Llama with random weights: the decoding cost structure, not its text, matters
        config = LlamaConfig(
            vocab_size=2000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
        )  # fmt: skip
        base = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, base.config.vocab_size, (ROWS, PROMPT_LEN), generator=generator)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    paths = make_adapters(base, RANK_SETS["r8"], max(KS_GEN), "all-linear", folder / "gen")
    models = build_variants(copy.deepcopy(base), paths, "all-linear", device, dtype)
    found = sweep(models, batch, KS_GEN, generate_call, args.gen_repeats, device, "decoding", ROWS * NEW_TOKENS)
    return {f"r8:{key}": {"tokens_per_s": row.pop("per_s"), **row} for key, row in found.items()}


def summary(cls: dict, gen: dict) -> dict:
    """The ratios the issue sets targets for (of the parts that ran)."""
    out, top, gtop = {}, max(KS_CLS), max(KS_GEN)
    for set_name in RANK_SETS if cls else []:
        k1, kt = cls[f"{set_name}:K=1"]["examples_per_s"], cls[f"{set_name}:K={top}"]["examples_per_s"]
        out[f"cls {set_name}: lorakit K={top} / lorakit K=1 (target >= 0.9)"] = kt["lorakit"] / k1["lorakit"]
        out[f"cls {set_name}: lorakit K={top} / plain (target >= 0.9)"] = kt["lorakit"] / kt["plain"]
        out[f"cls {set_name}: peft K=1 / plain"] = k1["peft"] / k1["plain"]
        out[f"cls {set_name}: peft K={top} / plain"] = kt["peft"] / kt["plain"]
        out[f"cls {set_name}: merge-seq K={top} / plain"] = kt["merge-seq"] / kt["plain"]
    if gen:
        g1, gt = gen["r8:K=1"]["tokens_per_s"], gen[f"r8:K={gtop}"]["tokens_per_s"]
        out[f"decode K={gtop}: lorakit / peft (target >= 2)"] = gt["lorakit"] / gt["peft"]
        out[f"decode K={gtop}: lorakit / plain"] = gt["lorakit"] / gt["plain"]
        out[f"decode K={gtop}: merge-seq / plain"] = gt["merge-seq"] / gt["plain"]
        out["decode K=1: lorakit / plain"] = g1["lorakit"] / g1["plain"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7, help="rounds per classifier measurement")
    parser.add_argument("--gen-repeats", type=int, default=5, help="rounds per decoding measurement")
    parser.add_argument("--quick", action="store_true", help="3 classifier and 2 decoding rounds")
    parser.add_argument("--part", default="all", choices=["all", "classifier", "decoding"], help="what to run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--classifier", default=None, help="classifier base folder (default: the packaged MiniLM)")
    parser.add_argument("--model", default=None, help="causal LM folder for decoding (default: small random Llama)")
    parser.add_argument(
        "--out", default=None, help="JSON output (default: benchmarks/results/multi_adapter-<device>.json)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.gen_repeats = 3, 2
    torch.set_num_threads(args.threads)
    offline()
    args.classifier = args.classifier or str(default_model_path())
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        cls = part_classifier(args, device, dtype, Path(tmp)) if args.part in ("all", "classifier") else {}
        gen = part_decoding(args, device, dtype, Path(tmp)) if args.part in ("all", "decoding") else {}
    report = {
        "benchmark": "multi_adapter",
        "setup": {
            "rows": ROWS,
            "seq_len": SEQ_LEN,
            "prompt_len": PROMPT_LEN,
            "new_tokens": NEW_TOKENS,
            "device": str(device),
            "dtype": args.dtype,
            "threads": args.threads,
            "repeats": args.repeats,
            "gen_repeats": args.gen_repeats,
            "classifier": args.classifier,
            "decoder": args.model or "random Llama (256 hidden, 4 layers, vocab 2000)",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        },  # fmt: skip
        "classifier": cls,
        "decoding": gen,
        "summary": summary(cls, gen),
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"multi_adapter-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report["summary"].items():
        print(f"{key:55s} {value:6.3f}")
    for part, key in (("classifier", "examples_per_s"), ("decoding", "tokens_per_s")):
        for case, row in report[part].items():
            figures = "  ".join(f"{v}={x:9.1f}" for v, x in row[key].items())
            print(f"{part:10s} {case:12s} {key}: {figures}  |diff|={row['max_abs_diff_lorakit_vs_peft']:.1e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
