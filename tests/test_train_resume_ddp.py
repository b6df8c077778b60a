"""A killed run resumed from its checkpoint gives the uninterrupted run's losses exactly, and
two DDP processes give one process's losses (same global batch). Both start real processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from test_train_fixtures import bert_dir, child_env, cls_files, kill_train, train_argv  # noqa: F401

import lorakit
from lorakit.cli import main

pytestmark = pytest.mark.slow


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def args(model, files, out, *extra):
    return train_argv(model, files[0], out, "--log-every", "1", "--lr", "1e-2", *extra, max_steps=6)


def test_killed_run_resumes_exactly(tmp_path, bert_dir, cls_files):  # noqa: F811
    # dropout in the model and in LoRA: the resumed run must also restore the RNG state
    flags = ("--model-dropout", "0.1", "--dropout", "0.1", "--checkpoint-every", "2")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(args(bert_dir, cls_files, whole, *flags)) == 0
    # a real process, SIGKILLed after step 5; the last checkpoint is step 4
    assert kill_train(args(bert_dir, cls_files, killed, *flags), "step", "5") == "killed"
    assert not (killed / "summary.json").exists() and len(losses(killed)) == 5
    assert main(args(bert_dir, cls_files, killed, *flags)) == 2  # an unfinished run needs --resume
    assert main(args(bert_dir, cls_files, killed, *flags, "--resume", "--batch-size", "4")) == 2  # other plan
    assert main(args(bert_dir, cls_files, killed, *flags, "--resume")) == 0
    assert losses(killed) == pytest.approx(losses(whole), rel=1e-6, abs=1e-7)
    assert len(losses(killed)) == 6
    _, a, _ = lorakit.read_adapter(whole / "adapter")
    _, b, _ = lorakit.read_adapter(killed / "adapter")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_processes_match_one(tmp_path, bert_dir, cls_files):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(bert_dir, cls_files, one, "--batch-size", "8")) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    proc = subprocess.run(
        [*launcher, "-m", "lorakit.cli", *args(bert_dir, cls_files, two, "--batch-size", "4")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(two)) == 6  # only rank 0 wrote
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    _, a, _ = lorakit.read_adapter(one / "adapter")
    _, b, _ = lorakit.read_adapter(two / "adapter")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
