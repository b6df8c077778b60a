"""QLoRA and SVD extraction benchmarks (issue 6): lorakit vs PEFT vs the plain base, side by side.

    python benchmarks/variants_tools.py --section bench_qlora      # NF4 base vs fp32 LoRA, MiniLM 32 x 64
    python benchmarks/variants_tools.py --section bench_extract    # extraction error vs rank
    python benchmarks/variants_tools.py                            # both; --repeats N, --quick

bench_qlora: MiniLM as a sequence classifier, batch 32 x 64 tokens, LoRA r=8 on every linear
layer (the head trains in full), AdamW. One training step (forward, backward, optimizer) per
variant per round, variants in a rotating order, medians over rounds: lorakit fp32, PEFT fp32,
lorakit over the NF4 base (lorakit.variants.qlora), PEFT over the same NF4 base, and the plain fp32 base
model's forward + backward with nothing trainable but the head (a floor). Base memory: bytes of
the base parameters as stored (NF4 codes + quantisation state) against fp32.

bench_extract: a small BERT (hidden 128, 4 layers) fully fine-tuned on SST-2 sentences (word
ids from a hash vocabulary) for a few steps, then adapters extracted at ranks 1..full; per rank
the share of the weight change's energy kept, the relative Frobenius error of the updates, and
the largest logit error of base + adapter against the tuned model (rank 0 = the base itself).
Results: benchmarks/results/variants_tools-<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lorakit  # noqa: E402
from lorakit.defaults import default_model_path, offline  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2" / "train.tsv"


def _median_times(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each step, run round-robin with a rotating order."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in tqdm(range(repeats), desc="rounds", leave=False):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


# --- QLoRA ------------------------------------------------------------------------------------
def _minilm(device: str) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2).to(device).train()


def _train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()

    return step


def bench_qlora(repeats: int = 5, batch: int = 32, seq_len: int = 64, device: str = "cpu") -> dict:
    """Training-step time and base memory of LoRA over an NF4 base against fp32 LoRA."""
    import peft

    from lorakit.variants import qlora as quant

    offline()
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, 20000, (batch, seq_len), generator=gen).to(device),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long).to(device),
        "labels": torch.randint(0, 2, (batch,), generator=gen).to(device),
    }
    config = lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear", modules_to_save=["classifier"])

    def peft_model(base: torch.nn.Module) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = peft.LoraConfig(
                r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["classifier"], task_type="SEQ_CLS"
            )
            return peft.get_peft_model(base, cfg).train()

    models = {
        "lorakit-fp32": lorakit.inject(_minilm(device), config).train(),
        "peft-fp32": peft_model(_minilm(device)),
        "lorakit-nf4": lorakit.inject(quant.quantize_model(_minilm(device)), config).train(),
        "peft-nf4": peft_model(quant.quantize_model(_minilm(device))),
    }
    floor = _minilm(device)
    floor.requires_grad_(False)
    floor.classifier.requires_grad_(True)
    models["base-floor"] = floor
    steps = {name: _train_step(m, inputs) for name, m in models.items()}
    times = _median_times(steps, repeats)
    fp32_mem = quant.memory_report(_minilm("cpu"))
    nf4_mem = quant.memory_report(quant.quantize_model(_minilm("cpu")))
    return {
        "setup": {"model": "all-MiniLM-L6-v2 seq-cls", "batch": batch, "seq_len": seq_len, "r": 8, "device": device},
        "step_seconds": times,
        "ratios": {
            "lorakit nf4 / lorakit fp32": times["lorakit-nf4"] / times["lorakit-fp32"],
            "lorakit nf4 / peft nf4": times["lorakit-nf4"] / times["peft-nf4"],
            "lorakit fp32 / peft fp32": times["lorakit-fp32"] / times["peft-fp32"],
            "lorakit nf4 / base floor": times["lorakit-nf4"] / times["base-floor"],
        },
        "base_memory": {
            "fp32_bytes": fp32_mem["fp32_bytes"],
            "nf4_bytes": nf4_mem["base_bytes"],
            "ratio_whole_model": nf4_mem["ratio"],
            "ratio_quantized_linears_only": nf4_mem["quantized_bytes"] / nf4_mem["quantized_fp32_bytes"],
            "quantized_layers": nf4_mem["quantized_layers"],
        },
    }


# --- extraction -----------------------------------------------------------------------------
def _sst2_batches(count: int, batch: int, seq_len: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    lines = SST2.read_text(encoding="utf-8").splitlines()[1 : 1 + count * batch]
    ids, labels = [], []
    for line in lines:
        text, label = line.rsplit("\t", 1)
        # A stable (not Python's salted) hash of each word: a 1000-word vocabulary, no tokenizer needed.
        words = [sum(ord(c) * 31**i for i, c in enumerate(w)) % (vocab - 1) + 1 for w in text.split()][:seq_len]
        ids.append(words + [0] * (seq_len - len(words)))
        labels.append(int(label))
    ids_t, labels_t = torch.tensor(ids), torch.tensor(labels)
    return [(ids_t[i : i + batch], labels_t[i : i + batch]) for i in range(0, len(ids), batch)]


def bench_extract(ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128), steps: int = 30) -> dict:
    """Extraction error vs rank on a small BERT fully fine-tuned on SST-2 sentences."""
    from transformers import BertConfig, BertForSequenceClassification

    from lorakit.tools.extract import extract_adapter

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256
    )
    base = BertForSequenceClassification(config).eval()
    tuned = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(tuned.parameters(), lr=3e-4)
    batches = _sst2_batches(steps, 16, 32, config.vocab_size)
    for ids, labels in tqdm(batches, desc="full fine-tune", leave=False):
        loss = tuned(input_ids=ids, attention_mask=(ids > 0).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    tuned.eval()
    probe_ids = torch.cat([b[0] for b in batches[:4]])
    probe = {"input_ids": probe_ids, "attention_mask": (probe_ids > 0).long()}
    with torch.no_grad():
        target = tuned(**probe).logits
        rows = [{"rank": 0, "energy": 0.0, "max_logit_error": float((base(**probe).logits - target).abs().max())}]
    for rank in tqdm(ranks, desc="ranks", leave=False):
        start = time.perf_counter()
        model, report = extract_adapter(copy.deepcopy(base), tuned, rank)
        seconds = time.perf_counter() - start
        total = sum(r.delta_norm**2 for r in report)
        kept = sum(r.energy * r.delta_norm**2 for r in report)
        with torch.no_grad():
            error = float((model(**probe).logits - target).abs().max())
        rows.append(
            {
                "rank": rank,
                "energy": kept / total,
                "mean_layer_rel_error": statistics.mean(r.rel_error for r in report),
                "max_logit_error": error,
                "extract_seconds": seconds,
            }
        )
    return {"setup": {"model": "BERT h128 x4 layers", "finetune_steps": steps, "layers": len(report)}, "rows": rows}


SECTIONS = {"bench_qlora": bench_qlora, "bench_extract": bench_extract}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=list(SECTIONS), action="append", help="run only these (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds for the timings (default: 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1; the box is shared)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny batch, 1 round (numbers meaningless)")
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/variants_tools-<device>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
    }
    for name in args.section or list(SECTIONS):
        if name == "bench_qlora":
            size = {"batch": 4, "seq_len": 16} if args.quick else {}
            results[name] = bench_qlora(1 if args.quick else args.repeats, device=args.device, **size)
        else:
            results[name] = bench_extract((1, 4) if args.quick else bench_extract.__defaults__[0])
        print(json.dumps({name: results[name]}, indent=2))
    out = Path(args.out) if args.out else RESULTS / f"variants_tools-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
