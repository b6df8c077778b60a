"""Train, evaluate and demo the two LoRA adapters shipped with the SST-2 GPT (positive and negative text).

    python tools/train_sst2_adapters.py train      # one adapter per sentiment, with lorakit (H100: ~30 s)
    python tools/train_sst2_adapters.py evaluate   # perplexities + generations -> benchmarks/results/sst2_gpt.json

`train` injects r=8 LoRA into every Conv1D of the shipped GPT (c_attn, c_proj, c_fc) with
lorakit.inject, trains on the label-1 (positive) or label-0 (negative) SST-2 train sentences,
keeps the epoch with the lowest perplexity on the same side's dev sentences, and saves the
adapter with lorakit.save_adapter (PEFT's format). `evaluate` measures held-out perplexity of the
base and of each adapter on the positive and the negative dev sentences, and generates from the
same prompts with each, greedily and sampled.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_sst2_gpt import DEFAULT_DATA, DEFAULT_OUT, ROOT, batches, encode, perplexity, pick_device, read_tsv

import lorakit
from lorakit.defaults import offline

DEFAULT_ADAPTERS = DEFAULT_OUT.parent / "sst2-gpt-adapters"
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_RESULTS = RESULTS / "sst2_gpt.json"
MODEL_REPORT = RESULTS / "sst2_gpt_training.json"  # written by train_sst2_gpt.py model --report
ADAPTER_REPORT = RESULTS / "sst2_gpt_adapters_training.json"
SIDES = {"positive": 1, "negative": 0}
TARGETS = ["c_attn", "c_proj", "c_fc"]
PROMPTS = ["the movie is", "this film", "the acting"]


def load_base(folder: Path, device: str = "cpu"):
    """The shipped GPT and its tokenizer, offline, fp32, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    model.config.name_or_path = "sst2-gpt"  # recorded in adapter_config.json: no machine-specific path
    return model, tokenizer


def side_texts(path: Path, label: int) -> list[str]:
    """The sentences of one sentiment in an SST-2 file."""
    return [t for t, y in read_tsv(path) if y == label]


def train_side(args: argparse.Namespace, side: str, label: int) -> dict:
    """Train one adapter, keep its best dev epoch, save it; return its training record."""
    from tqdm import tqdm

    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tokenizer = load_base(Path(args.model), device)
    pad = tokenizer.pad_token_id
    data = Path(args.data)
    train = encode(tokenizer, side_texts(data / "train.tsv", label))
    dev = encode(tokenizer, side_texts(data / "dev.tsv", label))
    base_ppl = perplexity(model, dev, pad, device)
    config = lorakit.LoraConfig(r=args.r, alpha=args.alpha, dropout=args.lora_dropout, target_modules=TARGETS)
    lorakit.inject(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = sum(1 for _ in batches(train, args.batch_tokens, pad, shuffle=False)) * args.epochs
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    history, best, best_state = [], float("inf"), None
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=f"{side} adapter on {device}", unit="step")
    for epoch in range(1, args.epochs + 1):
        model.train()
        losses = []
        for batch in batches(train, args.batch_tokens, pad, shuffle=True, rng=rng):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
        dev_ppl = perplexity(model, dev, pad, device)
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "dev_ppl": dev_ppl})
        bar.set_postfix(dev_ppl=f"{dev_ppl:.2f}")
        if dev_ppl < best:
            best, best_state = dev_ppl, [p.detach().clone() for p in params]
    bar.close()
    with torch.no_grad():
        for p, kept in zip(params, best_state, strict=True):
            p.copy_(kept)
    lorakit.save_adapter(model.to("cpu"), Path(args.out) / side)
    return {
        "rows": len(train),
        "trainable_parameters": sum(p.numel() for p in params),
        "base_dev_ppl_own_side": base_ppl,
        "best_epoch": min(history, key=lambda h: h["dev_ppl"])["epoch"],
        "dev_ppl_own_side": best,
        "seconds": round(time.perf_counter() - started, 1),
        "history": history,
    }


def train_command(args: argparse.Namespace) -> None:
    """Train both adapters; write their records next to them (train_report.json)."""
    torch.set_num_threads(args.threads)
    adapters = {side: train_side(args, side, label) for side, label in SIDES.items()}
    device = pick_device(args.device)
    records = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "out", "data", "model", "report")},
        "adapters": adapters,
    }
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(records, indent=2) + "\n")
    print(json.dumps({s: {k: v for k, v in r.items() if k != "history"} for s, r in adapters.items()}, indent=2))


def generations(model, tokenizer, prompts: list[str], samples: int, seed: int) -> dict[str, dict[str, list[str]]]:
    """Greedy and sampled (top-k 40, temperature 0.8, fixed seed) continuations of each prompt."""
    out = {}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        settings = {"max_new_tokens": 25, "pad_token_id": tokenizer.pad_token_id}
        greedy = model.generate(**ids, do_sample=False, **settings)
        torch.manual_seed(seed)
        sampled = model.generate(
            **ids, do_sample=True, top_k=40, temperature=0.8, num_return_sequences=samples, **settings
        )
        decode = lambda rows: tokenizer.batch_decode(rows, skip_special_tokens=True)  # noqa: E731
        out[prompt] = {"greedy": decode(greedy), "sampled": decode(sampled)}
    return out


@torch.no_grad()
def sentence_nll(model, seqs: list[list[int]], pad_id: int, batch_size: int = 64) -> list[float]:
    """Summed next-token negative log-likelihood of each sequence (eos included), in order."""
    out = []
    for start in range(0, len(seqs), batch_size):
        rows = seqs[start : start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        out += nll.sum(dim=1).tolist()
    return out


def folder_bytes(folder: Path) -> int:
    """Total size of the files in a folder."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def evaluate_command(args: argparse.Namespace) -> None:
    """Perplexity of base / positive / negative on each dev side, generations, sizes -> one JSON file."""
    torch.set_num_threads(args.threads)
    folder, adapters = Path(args.model), Path(args.out)
    data = Path(args.data)
    model, tokenizer = load_base(folder)
    pad = tokenizer.pad_token_id
    dev = {side: encode(tokenizer, side_texts(data / "dev.tsv", label)) for side, label in SIDES.items()}
    ppl, gens, nll = {}, {}, {}
    started = time.perf_counter()
    for name in ("base", *SIDES):
        if name != "base":  # the base is measured first, as the plain transformers model with no LoRA layers
            lorakit.load_adapter(model, adapters / name, adapter_name=name)
            lorakit.set_adapter(model, name)
        with torch.inference_mode():
            ppl[name] = {f"dev_{side}": round(perplexity(model, seqs, pad), 2) for side, seqs in dev.items()}
            nll[name] = {side: sentence_nll(model, seqs, pad) for side, seqs in dev.items()}
            gens[name] = generations(model, tokenizer, PROMPTS, args.samples, args.seed)
    # The two adapters as a generative classifier: a sentence is positive when the positive adapter
    # finds it likelier. Its accuracy shows how much sentiment each adapter really took in.
    correct = sum(
        (p < n) == (side == "positive")
        for side in SIDES
        for p, n in zip(nll["positive"][side], nll["negative"][side], strict=True)
    )
    accuracy = correct / sum(len(seqs) for seqs in dev.values())
    weights = folder / "model.safetensors"
    results = {
        "what": "SST-2 GPT (lorakit's shipped causal-LM default) and its two shipped LoRA adapters",
        "model": {
            "parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
            "weights_bytes": weights.stat().st_size,
            "folder_bytes": folder_bytes(folder),
            "training": _read_json(MODEL_REPORT),
        },
        "adapters": {
            side: {
                "folder_bytes": folder_bytes(adapters / side),
                "weights_bytes": (adapters / side / "adapter_model.safetensors").stat().st_size,
            }
            for side in SIDES
        },
        "dev_rows": {side: len(seqs) for side, seqs in dev.items()},
        "perplexity": ppl,
        "generative_classifier_dev_accuracy": round(accuracy, 4),
        "generations": gens,
        "evaluate_seconds_cpu": round(time.perf_counter() - started, 1),
        "command": "python tools/train_sst2_adapters.py evaluate",
    }
    results["adapter_training"] = _read_json(ADAPTER_REPORT)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"perplexity": ppl, "generative_classifier_accuracy": accuracy}, indent=2))
    for name, by_prompt in gens.items():
        for g in by_prompt.values():
            print(f"[{name}] greedy: {g['greedy'][0]}")
            for s in g["sampled"]:
                print(f"[{name}]   sampled: {s}")


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand and run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("train", help="train the positive and negative adapters")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--report", default=str(ADAPTER_REPORT), help="write the training records (JSON) here")
    p.set_defaults(func=train_command)
    p = sub.add_parser("evaluate", help="perplexities and generations -> JSON")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--results", default=str(DEFAULT_RESULTS))
    p.set_defaults(func=evaluate_command)
    for p in sub.choices.values():
        p.add_argument("--model", default=str(DEFAULT_OUT), help="the base model folder")
        p.add_argument("--out", default=str(DEFAULT_ADAPTERS), help="folder holding positive/ and negative/")
        p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with SST-2 train.tsv and dev.tsv")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
