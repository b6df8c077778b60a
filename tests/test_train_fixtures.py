"""Shared pieces of the training tests: tiny model folders (random weights, the packaged
MiniLM's tokenizer) and small labelled data files. Nothing here is a test itself."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lorakit.defaults import default_model_path, offline

WORDS = {
    "pos": ["good", "great", "fine", "happy", "lovely"],
    "neg": ["bad", "awful", "sad", "poor", "ugly"],
    "neu": ["table", "chair", "window", "paper", "door"],
}
FILLER = ["the", "a", "movie", "was", "very", "quite", "and", "it", "story", "day"]


def make_rows(n: int, seed: int = 0, labels: tuple[str, ...] = ("pos", "neg", "neu")) -> list[dict[str, str]]:
    """n labelled sentences of varied length; the label is readable from a key word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 12))]
        words.insert(rng.randint(0, len(words)), rng.choice(WORDS[label]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_tsv(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("text", "label")) -> Path:
    lines = ["\t".join(columns)] + ["\t".join(r[c] for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train_argv(
    model: Path, train: Path, out: Path, *extra: str, eval_file: Path | None = None, max_steps: int = 2
) -> list[str]:
    """`lorakit train` arguments: batch size 8, no progress bar; `extra` comes last, so its flags win."""
    argv = ["train", "--model", str(model), "--train", str(train)]
    if eval_file is not None:
        argv += ["--eval", str(eval_file)]
    return [*argv, "--out", str(out), "--max-steps", str(max_steps), "--batch-size", "8", "--no-progress", *extra]


def _tokenizer():
    from transformers import AutoTokenizer

    offline()
    return AutoTokenizer.from_pretrained(default_model_path())


def _save_bert(folder: Path, seed: int) -> Path:
    """A 2-layer BERT (hidden 32) with random weights from `seed` and MiniLM's tokenizer, saved in `folder`."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    BertModel(config).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved as a Hugging Face folder."""
    return _save_bert(tmp_path_factory.mktemp("tiny-bert"), seed=0)


@pytest.fixture(scope="session")
def other_bert_dir(tmp_path_factory) -> Path:
    """The same architecture with other random weights (an adapter for bert_dir does not fit)."""
    return _save_bert(tmp_path_factory.mktemp("tiny-bert-other"), seed=1)


@pytest.fixture(scope="session")
def gpt_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (n_embd 32) over MiniLM's vocabulary, saved with that tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt")
    torch.manual_seed(0)
    tok = _tokenizer()
    config = GPT2Config(
        vocab_size=30522,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def cls_files(tmp_path_factory) -> tuple[Path, Path]:
    """(train.tsv with 96 rows, dev.tsv with 30 rows), three labels."""
    folder = tmp_path_factory.mktemp("cls-data")
    return write_tsv(folder / "train.tsv", make_rows(96, 0)), write_tsv(folder / "dev.tsv", make_rows(30, 1))


# --- killing a real `lorakit train` process at a known point ------------------------------------
# The child is `lorakit.cli.main(argv)` with two test-side hooks set through the Python API (no
# hook in lorakit itself): `on_step` of the Trainer, and a wrapper around atomic._swap_in. When
# the chosen point is reached the child prints KILL-ME and sleeps; the parent then sends SIGKILL.
CHILD = r"""
import sys, time
from lorakit.files import atomic
from lorakit.cli import main
from lorakit.train import loop

mode, arg, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
seen = {}

def park():
    print("KILL-ME", flush=True)
    time.sleep(600)

if mode == "step":
    init = loop.Trainer.__init__
    def patched(self, config, on_step=None):
        init(self, config, on_step=lambda step: park() if step == int(arg) else None)
    loop.Trainer.__init__ = patched
elif mode == "swap":  # arg NAME:K: die with the K-th new NAME folder written but not yet swapped in
    name, k = arg.split(":")
    swap = atomic._swap_in
    def slow_swap(tmp, out):
        if out.name == name:
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == int(k):
                park()
        swap(tmp, out)
    atomic._swap_in = slow_swap
sys.exit(main(argv))
"""


def child_env(**extra):
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


def kill_train(argv: list[str], mode: str = "step", arg: str = "1", after: float | None = None) -> str:
    """Run `lorakit train argv` in a child and SIGKILL it at the point `mode`/`arg` (or `after`
    seconds, if sooner). Returns "killed", or "finished" when the run ended before the point."""
    import signal
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, arg, *map(str, argv)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    timer = threading.Timer(after, proc.send_signal, (signal.SIGKILL,)) if after else None
    if timer:
        timer.start()
    try:
        line = proc.stdout.readline()
        if "KILL-ME" in line:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode == -signal.SIGKILL:
        return "killed"
    assert proc.returncode == 0, err[-2000:]
    return "finished"
