"""`lorakit train` / `lorakit eval` from the command line: outputs, and one clear line + exit 2
for every kind of bad input, with nothing overwritten."""

from __future__ import annotations

import json

import pytest
from test_train_fixtures import (  # noqa: F401
    bert_dir,
    cls_files,
    kill_train,
    make_rows,
    other_bert_dir,
    train_argv,
    write_tsv,
)

from lorakit.cli import main


def train_args(model, files, out, *extra):
    return train_argv(model, files[0], out, *extra, eval_file=files[1])


def one_error_line(capsys, code, command="train"):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"lorakit {command}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, bert_dir, cls_files):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(train_args(bert_dir, cls_files, out)) == 0
    return out


def test_train_writes_every_output(finished_run, capsys):
    names = {p.name for p in finished_run.iterdir()}
    assert {"adapter", "metrics.jsonl", "loss.png", "summary.json"} <= names
    summary = json.loads((finished_run / "summary.json").read_text())
    for key in ("wall_time_s", "examples_per_s", "peak_rss_mib", "trainable_params", "adapter_bytes", "final_eval"):
        assert key in summary
    line = json.loads((finished_run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "epoch", "loss", "lr", "examples_per_s"} <= set(line)


def test_finished_run_is_not_overwritten(finished_run, bert_dir, cls_files, capsys):  # noqa: F811
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    line = one_error_line(capsys, main(train_args(bert_dir, cls_files, finished_run)))
    assert "finished run" in line and "--overwrite" in line
    assert {p.name: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == before
    (finished_run / "mine.txt").write_text("keep me")
    assert main(train_args(bert_dir, cls_files, finished_run, "--overwrite", "--max-steps", "1")) == 0
    assert json.loads((finished_run / "summary.json").read_text())["steps"] == 1
    assert (finished_run / "mine.txt").read_text() == "keep me"  # --overwrite deletes lorakit's outputs only


@pytest.mark.parametrize(
    ("make", "flags", "expected"),
    [
        ("missing", [], "does not exist"),
        ("empty", [], "is empty"),
        ("latin1", [], "not UTF-8 text (bad byte at offset"),
        ("ok", ["--text-column", "review"], "no column 'review'; columns are: text, label"),
        ("ok", ["--label-column", "stars"], "columns are: text, label"),
        ("ok", ["--eval-split", "0.2"], "not both"),
        ("ok", ["--model", "/nonexistent/model"], "not a Hugging Face model folder"),
    ],
)
def test_bad_train_input(tmp_path, capsys, bert_dir, cls_files, make, flags, expected):  # noqa: F811
    data = tmp_path / "train.tsv"
    if make == "empty":
        data.write_text("")
    elif make == "latin1":
        data.write_bytes("text\tlabel\ncaf\xe9\tpos\n".encode("latin-1"))
    elif make == "ok":
        write_tsv(data, make_rows(20))
    out = tmp_path / "out"
    line = one_error_line(capsys, main(train_args(bert_dir, (data, cls_files[1]), out, *flags)))
    assert expected in line
    assert not out.exists()  # nothing written for bad input


def test_unknown_config_keys_all_listed(tmp_path, capsys, bert_dir, cls_files):  # noqa: F811
    config = tmp_path / "run.toml"
    config.write_text(f'model = "{bert_dir}"\nlerning_rate = 0.1\nrank = "eight"\nepochs = 1\n')
    line = one_error_line(capsys, main(["train", "--config", str(config), "--train", str(cls_files[0])]))
    assert "unknown key 'lerning_rate'" in line and "rank='eight'" in line


def test_eval_command_and_its_errors(finished_run, tmp_path, capsys, bert_dir, other_bert_dir, cls_files):  # noqa: F811
    summary = json.loads((finished_run / "summary.json").read_text())
    code = main(
        [
            "eval",
            "--model",
            str(bert_dir),
            "--adapter",
            str(finished_run / "adapter"),
            "--data",
            str(cls_files[1]),
            "--json",
        ]
    )
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and got["accuracy"] == pytest.approx(summary["final_eval"]["accuracy"])
    assert got["loss"] == pytest.approx(summary["final_eval"]["loss"], abs=1e-5)
    bad = write_tsv(tmp_path / "bad.tsv", [{"text": "x", "label": "pos"}, {"text": "y", "label": "great"}])
    line = one_error_line(
        capsys, main(["eval", "--model", str(bert_dir), "--adapter", str(finished_run), "--data", str(bad)]), "eval"
    )
    assert "'great' are not in the model's label set (neg, neu, pos)" in line
    line = one_error_line(
        capsys,
        main(["eval", "--model", str(other_bert_dir), "--adapter", str(finished_run), "--data", str(cls_files[1])]),
        "eval",
    )
    assert "different base model" in line
    line = one_error_line(capsys, main(["eval", "--adapter", str(tmp_path / "none"), "--data", str(bad)]), "eval")
    assert "no such adapter folder" in line
    line = one_error_line(capsys, main(["eval", "--adapter", str(finished_run)]), "eval")
    assert "missing --data" in line


def test_resume_without_checkpoint_and_unfinished_dir(tmp_path, capsys, bert_dir, cls_files):  # noqa: F811
    line = one_error_line(capsys, main(train_args(bert_dir, cls_files, tmp_path / "new", "--resume")))
    assert "no checkpoint" in line


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_overwrite_keeps_the_finished_run_until_the_new_one_replaces_it(tmp_path, bert_dir, cls_files):  # noqa: F811
    out = tmp_path / "run"
    assert main(train_args(bert_dir, cls_files, out, "--checkpoint-every", "1", "--max-steps", "3")) == 0
    kept = {name: _snapshot(out / name) for name in ("adapter",)}
    summary = (out / "summary.json").read_bytes()
    # a real process SIGKILLed after 2 steps of the new run (and its first checkpoint)
    again = train_args(bert_dir, cls_files, out, "--overwrite", "--max-steps", "8", "--log-every", "1")
    assert kill_train([*again, "--checkpoint-every", "2"], "step", "2") == "killed"
    assert {name: _snapshot(out / name) for name in kept} == kept and (out / "summary.json").read_bytes() == summary
    assert json.loads((out / "checkpoint" / "manifest.json").read_text())["step"] == 2  # the new run's
    assert main([*again, "--full", "--lr", "1e-4"]) == 0  # a finished new run of the other kind
    assert (out / "model" / "config.json").is_file() and not (out / "adapter").exists()  # the stale one went
    assert json.loads((out / "summary.json").read_text())["steps"] == 8 and not (out / "checkpoint").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
