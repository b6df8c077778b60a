"""Checkpoints hold no pickle and are checked before use: a flipped byte, a step past the schedule,
an old pickle checkpoint and a full disk each end in one line and exit 2; a torn last line of
metrics.jsonl does not block --resume, and the resumed run still matches the uninterrupted one."""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import shutil

import pytest
from test_train_fixtures import bert_dir, cls_files, train_argv  # noqa: F401

from lorakit.cli import main
from lorakit.train import TrainConfig
from lorakit.train.loop import Trainer

pytestmark = pytest.mark.slow
FLAGS = ("--log-every", "1", "--lr", "1e-2", "--dropout", "0.1", "--model-dropout", "0.1", "--checkpoint-every", "2")


class Stop(BaseException):
    """Raised by on_step: the run stops there as if killed (nothing after the step runs)."""


def argv(model, files, out, *extra):
    return train_argv(model, files[0], out, *FLAGS, *extra, max_steps=6)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bert_dir, cls_files):  # noqa: F811
    """(the uninterrupted run, a run stopped after step 5 with its checkpoint at step 4)."""
    root = tmp_path_factory.mktemp("ckpt")
    assert main(argv(bert_dir, cls_files, root / "whole")) == 0
    config = dict(model=str(bert_dir), train=str(cls_files[0]), out=str(root / "stopped"), max_steps=6)
    config.update(batch_size=8, log_every=1, lr=1e-2, dropout=0.1, model_dropout=0.1, checkpoint_every=2)

    def stop(step):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        Trainer(TrainConfig(**config, progress=False), on_step=stop).run()
    return root / "whole", root / "stopped"


def copy(runs, tmp_path):
    return shutil.copytree(runs[1], tmp_path / "run")


def one_line(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lorakit train: error: "), err
    return err[0]


def test_the_checkpoint_has_no_pickle_and_resumes_bit_exact(runs, tmp_path, bert_dir, cls_files):  # noqa: F811
    out = copy(runs, tmp_path)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "manifest.json",
        "state.json",
        "tensors.safetensors",
    ]
    assert main(argv(bert_dir, cls_files, out, "--resume")) == 0
    assert losses(out) == losses(runs[0])  # bit-exact


@pytest.mark.parametrize("name", ["tensors.safetensors", "state.json", "manifest.json"])
def test_a_flipped_byte_is_refused(runs, tmp_path, capsys, bert_dir, cls_files, name):  # noqa: F811
    out = copy(runs, tmp_path)
    path = out / "checkpoint" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    line = one_line(capsys, main(argv(bert_dir, cls_files, out, "--resume")))
    assert "damaged" in line and "checkpoint" in line


def test_a_torn_last_metrics_line_does_not_block_resume(runs, tmp_path, bert_dir, cls_files):  # noqa: F811
    out = copy(runs, tmp_path)
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 6, "epoch": 0.5, "lo')  # killed in the middle of a write
    assert main(argv(bert_dir, cls_files, out, "--resume")) == 0
    assert losses(out) == losses(runs[0])


def _rewrite_state(out, **changes):
    folder = out / "checkpoint"
    state = json.loads((folder / "state.json").read_text())
    state.update(changes)
    (folder / "state.json").write_text(json.dumps(state))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.json"] = hashlib.sha256((folder / "state.json").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("step", [6, 99, 0, "4"])
def test_a_step_outside_the_schedule_is_refused(runs, tmp_path, capsys, bert_dir, cls_files, step):  # noqa: F811
    out = copy(runs, tmp_path)
    _rewrite_state(out, step=step)
    line = one_line(capsys, main(argv(bert_dir, cls_files, out, "--resume")))
    assert "outside this run's schedule of 6 steps" in line
    assert not (out / "summary.json").exists()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling this creates the marker file


def test_an_old_pickle_checkpoint_is_refused_unread(runs, tmp_path, capsys, bert_dir, cls_files):  # noqa: F811
    out = copy(runs, tmp_path)
    shutil.rmtree(out / "checkpoint")
    (out / "checkpoint").mkdir()
    marker = tmp_path / "pwned"
    (out / "checkpoint" / "state.pt").write_bytes(pickle.dumps({"step": 4, "x": Payload(marker)}))
    line = one_line(capsys, main(argv(bert_dir, cls_files, out, "--resume")))
    assert "old pickle checkpoint" in line and "--overwrite" in line
    assert not marker.exists()


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, bert_dir, cls_files):  # noqa: F811
    import safetensors.torch

    out, real, calls = tmp_path / "fresh", safetensors.torch.save_file, []

    def full_at_second_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the step-4 checkpoint: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_at_second_checkpoint)
    line = one_line(capsys, main(argv(bert_dir, cls_files, out)))
    assert "No space left on device" in line and "--resume" in line
    assert json.loads((out / "checkpoint" / "manifest.json").read_text())["step"] == 2  # the last one stays
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()

    def full_plot(*args, **kwargs):  # anywhere else (here the plot): still one line, exit 2
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "loss.png"))

    monkeypatch.setattr("lorakit.train.loop.plot_losses", full_plot)
    line = one_line(capsys, main(argv(bert_dir, cls_files, tmp_path / "new")))
    assert "no space left" in line and "loss.png" in line
