"""`lorakit demo`: the whole life of an adapter on the packaged MiniLM, in about a minute.

Inject LoRA into a sentence classifier, train a few steps on built-in sentences, save the
adapter in PEFT's format, load it into a fresh copy of the base, merge, and check that every
form gives the same logits.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

import lorakit
from lorakit.defaults import default_model_path, offline

POSITIVE = [
    "a warm, funny and beautifully acted film",
    "one of the best movies of the year",
    "the story is moving and the cast is superb",
    "i loved every minute of it",
    "a delightful surprise from start to finish",
    "clever, charming and full of heart",
    "the performances are wonderful",
    "an uplifting and joyful experience",
]
NEGATIVE = [
    "a dull, lifeless and boring film",
    "one of the worst movies of the year",
    "the plot is a mess and the acting is wooden",
    "i hated every minute of it",
    "a tedious waste of two hours",
    "clumsy, predictable and without charm",
    "the performances are painfully bad",
    "a depressing and joyless slog",
]


def run_demo(out_dir: str | Path = "runs/demo", steps: int = 30, seed: int = 0) -> int:
    """Run the demo, print a summary, return 0 if every check passed (1 otherwise)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    offline()
    torch.manual_seed(seed)
    path = default_model_path()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def fresh_base():
        torch.manual_seed(seed)  # the same fresh classifier head every time
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    texts = POSITIVE + NEGATIVE
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    batch = tokenizer(texts, padding=True, return_tensors="pt")

    model = fresh_base()
    config = lorakit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    lorakit.inject(model, config)
    report = lorakit.parameter_report(model)
    accuracy_before = _accuracy(model, batch, labels)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="training", unit="step"):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    accuracy_after = _accuracy(model, batch, labels)

    adapter_dir = lorakit.save_adapter(model, out_dir / "adapter")
    with torch.inference_mode():
        trained = model(**batch).logits
    reloaded = lorakit.load_adapter(fresh_base(), adapter_dir).eval()
    with torch.inference_mode():
        unmerged = reloaded(**batch).logits
        lorakit.merge(reloaded)
        merged = reloaded(**batch).logits
    plain = lorakit.merge_and_unload(reloaded)
    plain.save_pretrained(out_dir / "merged")
    tokenizer.save_pretrained(out_dir / "merged")
    reread = AutoModelForSequenceClassification.from_pretrained(out_dir / "merged").eval()
    with torch.inference_mode():
        from_disk = reread(**batch).logits

    checks = {
        "reloaded adapter == trained model": (unmerged - trained).abs().max().item(),
        "merged == unmerged": (merged - unmerged).abs().max().item(),
        "merged checkpoint (plain transformers) == unmerged": (from_disk - unmerged).abs().max().item(),
    }
    size_kib = (adapter_dir / "adapter_model.safetensors").stat().st_size / 1024
    print("\nlorakit demo on all-MiniLM-L6-v2 (packaged, offline)")
    print(f"  trainable parameters : {report['trainable']:,} of {report['total']:,} ({report['percent']:.2f}%)")
    print(f"  training loss        : {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps")
    print(f"  accuracy (demo set)  : {accuracy_before:.0%} -> {accuracy_after:.0%}")
    print(f"  adapter              : {adapter_dir} ({size_kib:.0f} KiB, PEFT format)")
    print(f"  merged model         : {out_dir / 'merged'}")
    ok = True
    for name, diff in checks.items():
        passed = diff <= 1e-5
        ok &= passed
        print(f"  {'ok  ' if passed else 'FAIL'} {name}: max |diff| = {diff:.2e}")
    print(f"  wall time            : {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


def _accuracy(model, batch, labels) -> float:
    model.eval()
    with torch.inference_mode():
        predicted = model(**batch).logits.argmax(-1)
    return (predicted == labels).float().mean().item()
