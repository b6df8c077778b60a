"""Train, evaluate and ship the chat adapter of the SST-2 GPT (what `lorakit serve` answers as "chat").

    python tools/train_chat_adapter.py      # ~5 min on 2 CPU cores

1. builds conversations from real SST-2 text (tools/make_chat_data.py: "write the opening of a
   positive movie review ." -> the first words of a real positive sentence);
2. trains an r=8 LoRA on every Conv1D of the shipped GPT with `lorakit train --task causal-lm`
   (the loss on the assistant's turns only; the chat template lorakit writes for a model
   without one goes into the adapter folder);
3. copies the adapter to src/lorakit/models/sst2-gpt-adapters/chat;
4. measures the held-out (dev.tsv sentences) assistant-turn loss of the base and of the adapter
   with the same template, and greedy answers to a positive and a negative request, into
   benchmarks/results/chat_adapter.json.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_chat_data import DEFAULT_DATA, build, read_sentences, write_jsonl

import lorakit
from lorakit.hf import load_tokenizer
from lorakit.train import chat
from lorakit.train.evaluate import evaluate
from lorakit.train.model import load_model
from lorakit.train.prepare import chat_dataset

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "src" / "lorakit" / "models" / "sst2-gpt"
SHIPPED = ROOT / "src" / "lorakit" / "models" / "sst2-gpt-adapters" / "chat"
RUN = ROOT / "runs" / "chat"
RESULTS = ROOT / "benchmarks" / "results" / "chat_adapter.json"
TRAIN_FLAGS = [
    "--rank", "8", "--targets", "c_attn,c_proj,c_fc", "--max-steps", "400", "--batch-size", "16",
    "--lr", "2e-3", "--eval-every", "100", "--seed", "0",
]  # fmt: skip
REQUESTS = ["write the opening of a positive movie review .", "write the opening of a negative movie review ."]


def make_data(folder: Path) -> tuple[Path, Path]:
    train = build(read_sentences(DEFAULT_DATA / "train.tsv"), 4000, seed=0)
    dev = build(read_sentences(DEFAULT_DATA / "dev.tsv"), 400, seed=1)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "dev.jsonl", dev)
    return folder / "train.jsonl", folder / "dev.jsonl"


def train(train_file: Path, dev_file: Path) -> None:
    command = [sys.executable, "-m", "lorakit.cli", "train", "--task", "causal-lm", "--model", str(BASE)]
    command += ["--train", str(train_file), "--eval", str(dev_file), "--out", str(RUN), "--overwrite", *TRAIN_FLAGS]
    subprocess.run(command, check=True)


def answer(model, tokenizer, template: str, request: str) -> str:
    prompt = chat.render_prompt(tokenizer, [{"role": "user", "content": request}], template)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def measure(dev_file: Path) -> dict:
    tokenizer = load_tokenizer(BASE)
    template = chat.read_template(SHIPPED)
    data = chat_dataset(dev_file, tokenizer, template, max_length=128)
    model = lorakit.load_adapter(load_model(BASE, "causal-lm", None), SHIPPED).eval()
    report = {"dev_conversations": len(data), "template": "lorakit default (chat_template.jinja in the adapter)"}
    with lorakit.disable_adapters(model):
        report["base_loss"] = evaluate(model, tokenizer, data)["loss"]
        report["base_answers"] = {r: answer(model, tokenizer, template, r) for r in REQUESTS}
    report["adapter_loss"] = evaluate(model, tokenizer, data)["loss"]
    report["adapter_answers"] = {r: answer(model, tokenizer, template, r) for r in REQUESTS}
    for side in ("base", "adapter"):
        report[f"{side}_perplexity"] = math.exp(report[f"{side}_loss"])
    report["train_command"] = "lorakit train --task causal-lm --model <sst2-gpt> " + " ".join(TRAIN_FLAGS)
    return report


def main() -> None:
    train_file, dev_file = make_data(RUN.parent / "chat-data")
    train(train_file, dev_file)
    if SHIPPED.exists():
        shutil.rmtree(SHIPPED)
    shutil.copytree(RUN / "adapter", SHIPPED)
    report = measure(dev_file)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
