"""SST-2 quality and cost: lorakit LoRA, lorakit's default recipe, full fine-tuning, PEFT + Trainer.

Base: the packaged MiniLM (all-MiniLM-L6-v2) with a fresh classification head. Every config
gets the same budget: one epoch over a fixed 20,000-example sample of train.tsv (seed 0),
batch 32, evaluated on dev.tsv (872 sentences).

  lorakit-peft      lorakit LoRA with PEFT's usual settings: r=8, alpha=16, dropout 0.1 on
                    query,value, head trained, lr 5e-4, linear schedule, 6% warm-up
  lorakit-default   `lorakit train` with no adapter or optimiser flags (its own recipe)
  lorakit-full      lorakit full fine-tuning, lr 5e-5
  peft-trainer      PEFT + Hugging Face Trainer, the settings of lorakit-peft, DataCollatorWithPadding
  hf-full           (optional) Hugging Face Trainer full fine-tuning, lr 5e-5

Each config runs in its own child process (clean peak RSS; no shared caches), one after the
other. Wall time is measured the same way in all: from loading the tokenizer to the end of
the dev evaluation (tokenizing, model loading, training, evaluation, saving).

  python benchmarks/quality_sst2.py                       # all four (~30 quiet CPU minutes)
  python benchmarks/quality_sst2.py --only lorakit-default,peft-trainer --limit 3000
  python benchmarks/quality_sst2.py --only lorakit-peft --set '{"model_dropout": 0.0}'   # change lorakit fields

Targets: lorakit-peft within 0.5 point of peft-trainer's dev accuracy in <= 0.5x its wall time;
lorakit-default within 1.0 point of lorakit-full, also in <= 0.5x peft-trainer's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ["lorakit-peft", "lorakit-default", "lorakit-full", "peft-trainer"]
OPTIONAL = ["hf-full"]
BATCH, SEED = 32, 0
PEFT_LORA = {"r": 8, "alpha": 16, "dropout": 0.1, "targets": ["query", "value"], "lr": 5e-4, "warmup": 0.06}


def sample_train(data: Path, limit: int, folder: Path) -> Path:
    """The fixed seed-0 sample of `limit` training rows, written as a TSV."""
    lines = (data / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    chosen = random.Random(SEED).sample(rows, min(limit, len(rows)))
    path = folder / f"train-{limit}.tsv"
    path.write_text("\n".join([header, *chosen]) + "\n", encoding="utf-8")
    return path


# --- children: one config each ----------------------------------------------------------------
def run_lorakit(name: str, train_file: Path, dev: Path, work: Path, opts: argparse.Namespace) -> dict:
    from lorakit.train import TrainConfig, train

    common = {"train": str(train_file), "eval": str(dev), "out": str(work / name), "batch_size": BATCH}
    common["seed"] = opts.seed
    common.update(epochs=1, log_every=50, overwrite=True, model=opts.model, precision=opts.precision)
    if name == "lorakit-peft":
        p = PEFT_LORA
        fields = {"rank": p["r"], "alpha": p["alpha"], "dropout": p["dropout"], "targets": ",".join(p["targets"])}
        fields.update(lr=p["lr"], schedule="linear", warmup=p["warmup"], model_dropout=None)  # model's own 0.1, as PEFT
    elif name == "lorakit-default":
        fields = {}
    else:
        fields = {"full": True, "lr": 5e-5, "model_dropout": None}
    fields.update(json.loads(opts.set or "{}"))  # --set changes any field (recipe searches)
    config = TrainConfig(**common, **fields)
    summary = train(config)
    ev = summary["final_eval"]
    return {
        "dev_accuracy": ev["accuracy"],
        "dev_macro_f1": ev["macro_f1"],
        "examples_per_s": summary["examples_per_s"],
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "adapter_bytes": summary["adapter_bytes"],
        "train_time_s": summary["train_time_s"],
        "recipe": {k: v for k, v in vars(config).items() if k not in ("extra", "train", "eval", "out")},
    }


def run_hf(name: str, train_file: Path, dev: Path, work: Path, opts: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from lorakit.defaults import default_model_path, offline
    from lorakit.train import read_table
    from lorakit.train.report import folder_bytes

    offline()
    path = opts.model or default_model_path()
    tok = AutoTokenizer.from_pretrained(path)

    def encode(file: Path) -> list[dict]:
        rows = read_table(file)
        enc = tok([r["sentence"] for r in rows], truncation=True)
        return [
            {"input_ids": i, "attention_mask": m, "labels": int(r["label"])}
            for i, m, r in zip(enc["input_ids"], enc["attention_mask"], rows, strict=True)
        ]

    train_set, dev_set = encode(train_file), encode(dev)
    torch.manual_seed(opts.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    lr = 5e-5
    if name == "peft-trainer":
        import peft

        p = PEFT_LORA
        cfg = peft.LoraConfig(
            task_type="SEQ_CLS", r=p["r"], lora_alpha=p["alpha"], lora_dropout=p["dropout"], target_modules=p["targets"]
        )
        model = peft.get_peft_model(model, cfg)
        lr = p["lr"]
    args = TrainingArguments(
        output_dir=str(work / name),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=64,
        learning_rate=lr,
        num_train_epochs=1,
        lr_scheduler_type="linear",
        warmup_steps=0.06,  # transformers 5: a float below 1 is a ratio (warmup_ratio is gone)
        seed=opts.seed,
        save_strategy="no",
        report_to=[],
        logging_steps=50,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tok))
    out = trainer.train()
    pred = trainer.predict(dev_set)
    preds = np.argmax(pred.predictions, axis=-1)
    labels = np.array([r["labels"] for r in dev_set])
    from lorakit.train.metrics import classification_metrics

    metrics = classification_metrics(preds.tolist(), labels.tolist())
    saved = work / name / "saved"
    model.save_pretrained(saved)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "dev_accuracy": metrics["accuracy"],
        "dev_macro_f1": metrics["macro_f1"],
        "examples_per_s": out.metrics["train_samples_per_second"],
        "train_time_s": out.metrics["train_runtime"],
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "adapter_bytes": folder_bytes(saved),
    }


def child(name: str, opts: argparse.Namespace) -> None:
    import torch

    from lorakit.train.report import peak_memory

    torch.set_num_threads(opts.threads)
    work, data = Path(opts.work), Path(opts.data)
    train_file = sample_train(data, opts.limit, work)
    started = time.perf_counter()
    runner = run_hf if name in ("peft-trainer", "hf-full") else run_lorakit
    result = runner(name, train_file, data / "dev.tsv", work, opts)
    result["wall_time_s"] = time.perf_counter() - started
    result.update(peak_memory())  # peak RSS, and peak CUDA memory on a GPU
    print("RESULT " + json.dumps(result), flush=True)


# --- parent -----------------------------------------------------------------------------------
def targets(results: dict[str, dict]) -> list[dict]:
    """The issue's targets, checked where both sides ran."""
    checks = []

    def add(what, a, b, points, wall_of, wall_limit=0.5):
        if a in results and b in results and wall_of in results:
            gap = 100 * (results[b]["dev_accuracy"] - results[a]["dev_accuracy"])
            ratio = results[a]["wall_time_s"] / results[wall_of]["wall_time_s"]
            checks.append(
                {
                    "target": what,
                    "accuracy_gap_points": gap,
                    "wall_ratio_vs_peft_trainer": ratio,
                    "met": gap <= points and ratio <= wall_limit,
                }
            )

    add(
        "lorakit-peft within 0.5 pt of peft-trainer, <= 0.5x its wall time",
        "lorakit-peft",
        "peft-trainer",
        0.5,
        "peft-trainer",
    )
    add(
        "lorakit-default within 1.0 pt of lorakit-full, <= 0.5x peft-trainer's wall time",
        "lorakit-default",
        "lorakit-full",
        1.0,
        "peft-trainer",
    )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated configs among {', '.join(CONFIGS + OPTIONAL)}")
    parser.add_argument("--limit", type=int, default=20000, help="training examples (default 20000)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/quality_sst2[-limitN].json)")
    parser.add_argument("--model", help="base model folder (default: the packaged MiniLM)")
    parser.add_argument("--data", default=str(DATA), help="folder with train.tsv and dev.tsv (../shared/data/sst2)")
    parser.add_argument("--precision", default="fp32", help="lorakit --precision (default fp32, as the Trainer)")
    parser.add_argument("--set", help="JSON of TrainConfig fields changed in the lorakit-* runs (recipe search)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (head, order, dropout); sample: seed 0")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        child(args.child, args)
        return 0
    names = args.only.split(",") if args.only else CONFIGS
    unknown = [n for n in names if n not in CONFIGS + OPTIONAL]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS + OPTIONAL)}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="quality_sst2-") as work:
        for name in names:
            print(f"== {name} (limit {args.limit}, {args.threads} threads)", flush=True)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--limit",
                str(args.limit),
                "--threads",
                str(args.threads),
                "--work",
                work,
                "--data",
                args.data,
                "--precision",
                args.precision,
                "--seed",
                str(args.seed),
            ]
            cmd += (["--model", args.model] if args.model else []) + (["--set", args.set] if args.set else [])
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr: live progress bars
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"{name} failed (exit {proc.returncode})", file=sys.stderr)
                results[name] = {"error": f"exit {proc.returncode}"}
                continue
            results[name] = json.loads(line[len("RESULT ") :])
            r = results[name]
            print(
                f"   dev acc {100 * r['dev_accuracy']:.2f}%  wall {r['wall_time_s']:.0f} s  "
                f"{r['examples_per_s']:.0f} ex/s  peak RSS {r['peak_rss_mib']:.0f} MiB  "
                f"trainable {r['trainable_params']:,}  saved {r['adapter_bytes'] / 1e6:.2f} MB",
                flush=True,
            )
    ok = {k: v for k, v in results.items() if "error" not in v}
    report = {
        "benchmark": "quality_sst2",
        "limit": args.limit,
        "precision": args.precision,
        "set": args.set,
        "model": args.model or "packaged MiniLM",
        "threads": args.threads,
        "batch": BATCH,
        "sample_seed": SEED,
        "seed": args.seed,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
        "targets": targets(ok),
    }
    for check in report["targets"]:
        print(
            f"{'MET ' if check['met'] else 'MISS'} {check['target']}: gap {check['accuracy_gap_points']:+.2f} pt, "
            f"wall {check['wall_ratio_vs_peft_trainer']:.2f}x"
        )
    out = (
        Path(args.out)
        if args.out
        else RESULTS / ("quality_sst2.json" if args.limit == 20000 else f"quality_sst2-limit{args.limit}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
