"""kill -9 a real `lorakit train` at seeded random steps, while a checkpoint is being written,
while an adapter is being written, and at a random moment; resume each time. The final adapter
and every logged loss must equal an uninterrupted run's bit for bit, and no finished output
(an adapter, a checkpoint, a finished run's summary) may ever be lost or damaged."""

from __future__ import annotations

import json
import random

import torch
from test_train_fixtures import bert_dir, cls_files, kill_train, train_argv  # noqa: F401

import lorakit
from lorakit.cli import main
from lorakit.train import checkpoint as ckpt

FLAGS = ("--log-every", "1", "--lr", "1e-2", "--dropout", "0.1", "--model-dropout", "0.1")
FLAGS += ("--checkpoint-every", "2", "--eval-every", "3")


def argv(bert, files, out, *extra):
    return train_argv(bert, files[0], out, *FLAGS, *extra, eval_file=files[1], max_steps=10)


def records(out):
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [{k: v for k, v in json.loads(line).items() if k != "examples_per_s"} for line in lines]  # not timing


def outputs(out) -> dict:
    """What a kill must never take away: each finished output, read back completely."""
    found = {}
    if (out / "adapter").is_dir():
        found["adapter"] = {k: v.clone() for k, v in lorakit.read_adapter(out / "adapter")[1].items()}
    if (out / "checkpoint").is_dir():
        found["checkpoint"] = ckpt.load_checkpoint(out)["step"]
    if (out / "summary.json").is_file():
        found["summary"] = (out / "summary.json").read_bytes()
    return found


def lost(before: dict, after: dict) -> int:
    """Outputs present before a kill and missing (or, for a finished run, changed) after it."""
    gone = [k for k in before if k not in after]
    if "summary" in before and after.get("summary") != before["summary"]:
        gone.append("summary")
    if "summary" in before and "adapter" in after:
        gone += [k for k in before["adapter"] if not torch.equal(before["adapter"][k], after["adapter"][k])]
    return len(gone)


def test_kill_and_resume(tmp_path, bert_dir, cls_files, capsys):  # noqa: F811
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert main(argv(bert_dir, cls_files, whole)) == 0
    want, want_adapter = records(whole), lorakit.read_adapter(whole / "adapter")[1]
    rng = random.Random(20261202)
    plan = [
        ("step", str(rng.randint(1, 3)), None),  # maybe before the first checkpoint: a fresh start
        ("swap", "checkpoint:2", None),  # this process's 2nd checkpoint written, not yet swapped in
        ("swap", "adapter:1", None),  # the new best adapter written, not yet swapped in
        ("step", str(rng.randint(6, 9)), rng.uniform(5.0, 8.0)),  # that step or a random moment, if sooner
    ]
    kills = exact = data_lost = resumes = 0
    for mode, arg, after in plan:
        before = outputs(run)
        resume = ("--resume",) if ckpt.has_checkpoint(run) else ()
        resumes += bool(resume)
        if kill_train(argv(bert_dir, cls_files, run, *resume), mode, arg, after=after) == "killed":
            kills += 1
        data_lost += lost(before, outputs(run))
        got = records(run)
        assert got == want[: len(got)]  # what each process logged, killed or not, is the uninterrupted run's
        exact += bool(resume)
        if (run / "summary.json").is_file():
            break
    if not (run / "summary.json").is_file():
        resumes += 1
        assert main(argv(bert_dir, cls_files, run, "--resume")) == 0
        exact += records(run) == want
    got_adapter = lorakit.read_adapter(run / "adapter")[1]
    assert records(run) == want  # every loss and eval metric, bit for bit
    assert all(torch.equal(want_adapter[k], got_adapter[k]) for k in want_adapter)
    # a finished run under --overwrite, killed while the new run writes its first adapter
    finished = outputs(run)
    assert kill_train(argv(bert_dir, cls_files, run, "--overwrite"), "swap", "adapter:1") == "killed"
    kills += 1
    data_lost += lost(finished, outputs(run))
    with capsys.disabled():
        print(f"\nkill/resume: kills survived {kills}, resumes bit-exact {exact}/{resumes}, data lost {data_lost}")
    assert data_lost == 0 and exact == resumes and kills >= 4
