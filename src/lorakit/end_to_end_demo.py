"""`lorakit demo`: the whole life of an adapter on the packaged MiniLM, in about a minute.

Fine-tunes all-MiniLM-L6-v2 with LoRA (lorakit's trainer, its default recipe) on the built-in
topic data set (300 hand-written sentences, 5 topics, 240 to train and 60 held out), measures
accuracy and macro-F1 on the held-out sentences before and after, saves the adapter in PEFT's
format, reloads it into a fresh base, merges it, saves the merged model with save_pretrained
and reads it back with plain transformers, and checks that every form gives the same logits
(and PEFT, when installed, too).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import UsageError

CHECK_TOLERANCE = 1e-4  # fp32 logits of one model computed two ways (merged weights round once more)


def demo_data_path() -> Path:
    """The folder of the built-in demo data set: train.jsonl and test.jsonl, lines of
    {"text": ..., "label": ...} with labels sports, food, weather, technology, money."""
    return Path(__file__).parent / "data" / "demo"


def run_demo(
    out_dir: str | Path = "runs/demo",
    steps: int | None = None,
    epochs: float = 5.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> int:
    """Run the demo, print its report, return 0 if every check passed (1 otherwise).

    `steps` (optimizer steps) overrides `epochs` over the 240 training sentences. Outputs:
    out_dir/train (adapter/, metrics.jsonl, loss.png, summary.json), out_dir/merged (a plain
    Hugging Face folder) and out_dir/demo_report.json."""
    from lorakit.commands._common import load_adapted
    from lorakit.core.adapters import merge, merge_and_unload
    from lorakit.defaults import offline
    from lorakit.files.atomic import replace_file, replace_folder
    from lorakit.train import TrainConfig, Trainer, evaluate

    offline()
    started = time.perf_counter()
    out = Path(out_dir)
    merged_dir = out / "merged"
    if merged_dir.is_dir() and any(merged_dir.iterdir()) and not (merged_dir / "config.json").is_file():
        raise UsageError(f"{merged_dir} holds files that are not a model; give the demo a new --out folder")
    data = demo_data_path()
    config = TrainConfig(
        train=str(data / "train.jsonl"),
        eval=str(data / "test.jsonl"),
        out=str(out / "train"),
        task="classify",
        epochs=epochs,
        max_steps=steps,
        batch_size=batch_size,
        seed=seed,
        log_every=5,
        overwrite=True,  # the demo's own folder: a second `make demo` replaces the first
        progress=progress,
    )
    trainer = Trainer(config)
    test, tokenizer = trainer.eval_data, trainer.tokenizer
    before = evaluate(trainer.model, tokenizer, test)  # LoRA B is zero: exactly the base + its fresh head
    summary = trainer.run()
    trained = trainer.model.eval()

    batch = tokenizer(test.texts, padding=True, return_tensors="pt")
    adapter_dir = Path(summary["output"])
    reloaded, _, info = load_adapted(None, str(adapter_dir))
    after = evaluate(reloaded, tokenizer, test, return_predictions=True)
    with torch.inference_mode():
        logits_trained = trained(**batch).logits
        logits_unmerged = reloaded(**batch).logits
        merge(reloaded)
        logits_merged = reloaded(**batch).logits
    plain = merge_and_unload(reloaded)

    def write(folder: Path) -> None:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    replace_folder(merged_dir, write)
    from transformers import AutoModelForSequenceClassification

    from lorakit.hf import load_pretrained

    from_disk = load_pretrained(merged_dir, AutoModelForSequenceClassification).eval()
    with torch.inference_mode():
        logits_disk = from_disk(**batch).logits
    checks = {
        "adapter reloaded from disk == trained model": _diff(logits_unmerged, logits_trained),
        "merged == unmerged": _diff(logits_merged, logits_unmerged),
        "merged folder read by plain transformers == unmerged": _diff(logits_disk, logits_unmerged),
    }
    peft_logits = _peft_logits(adapter_dir, len(test.labels), batch)
    if peft_logits is not None:
        checks["PEFT loading the adapter == lorakit"] = _diff(peft_logits, logits_unmerged)
    labels_ok = info["labels"] == test.labels and from_disk.config.id2label == dict(enumerate(test.labels))

    report = {
        "data": {"train": len(trainer.train_data), "test": len(test), "labels": test.labels},
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "steps": summary["steps"],
        "losses": _first_last_loss(out / "train" / "metrics.jsonl"),
        "before": {k: before[k] for k in ("accuracy", "macro_f1")},
        "after": {k: after[k] for k in ("accuracy", "macro_f1")},
        "adapter": str(adapter_dir),
        "adapter_bytes": (adapter_dir / "adapter_model.safetensors").stat().st_size,
        "merged": str(merged_dir),
        "checks": checks,
        "label_names_carried": labels_ok,
        "train_time_s": summary["train_time_s"],
        "wall_time_s": time.perf_counter() - started,
    }
    text = json.dumps(report, indent=2) + "\n"
    replace_file(out / "demo_report.json", lambda tmp: tmp.write_text(text))
    examples = [(test.texts[i], test.labels[after["predictions"][i]]) for i in range(3)]
    ok = labels_ok and all(diff <= CHECK_TOLERANCE for diff in checks.values())
    _print_report(report, examples)
    return 0 if ok else 1


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _peft_logits(adapter_dir: Path, num_labels: int, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The adapter's logits as PEFT computes them (None when PEFT is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    from transformers import AutoModelForSequenceClassification

    from lorakit.defaults import default_model_path
    from lorakit.hf import load_pretrained

    with warnings.catch_warnings():  # transformers' deprecation notes from inside PEFT are not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        base = load_pretrained(default_model_path(), AutoModelForSequenceClassification, num_labels=num_labels)
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.inference_mode():
        return model(**batch).logits


def _first_last_loss(metrics_file: Path) -> list[float]:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return [records[0]["loss"], records[-1]["loss"]] if records else []


def _print_report(report: dict[str, Any], examples: list[tuple[str, str]]) -> None:
    b, a = report["before"], report["after"]
    data = report["data"]
    total = report["total_params"]
    losses = report["losses"]
    print("\nlorakit demo: LoRA on all-MiniLM-L6-v2 (packaged, offline), built-in topic data set")
    print(f"  data                 : {data['train']} train / {data['test']} held out, {', '.join(data['labels'])}")
    print(f"  trainable parameters : {report['trainable_params']:,} of {total:,}")
    if losses:
        print(f"  training loss        : {losses[0]:.4f} -> {losses[-1]:.4f} in {report['steps']} steps")
    print(f"  held-out accuracy    : {b['accuracy']:.1%} -> {a['accuracy']:.1%}")
    print(f"  held-out macro-F1    : {b['macro_f1']:.3f} -> {a['macro_f1']:.3f}")
    print(f"  adapter (PEFT format): {report['adapter']} ({report['adapter_bytes'] / 1024:.0f} KiB)")
    print(f"  merged model         : {report['merged']} (plain transformers folder)")
    for text, label in examples:
        print(f"  predicted {label:<10} : {text}")
    for name, diff in report["checks"].items():
        print(f"  {'ok  ' if diff <= CHECK_TOLERANCE else 'FAIL'} {name}: max |diff| of logits = {diff:.2e}")
    print(
        f"  {'ok  ' if report['label_names_carried'] else 'FAIL'} label names carried to the adapter and merged model"
    )
    print(f"  wall time            : {report['wall_time_s']:.1f} s (training {report['train_time_s']:.1f} s)")
