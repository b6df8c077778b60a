"""Data files, data sets, batching and metrics of lorakit.train."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_fixtures import _tokenizer, make_rows, write_jsonl

from lorakit.errors import DataError
from lorakit.train.batching import collate, plan_epoch, shard
from lorakit.train.data import IGNORE_INDEX, CausalLMData, ClassificationData, find_column, read_table, split_rows
from lorakit.train.metrics import causal_lm_metrics, classification_metrics


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def test_read_table_formats_agree(tmp_path):
    rows = [{"text": 'he said "hi", then left', "label": "1"}, {"text": "plain", "label": "0"}]
    write_jsonl(tmp_path / "a.jsonl", [{"text": r["text"], "label": int(r["label"])} for r in rows])
    (tmp_path / "a.csv").write_text('text,label\n"he said ""hi"", then left",1\nplain,0\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text('text\tlabel\nhe said "hi", then left\t1\nplain\t0\n', encoding="utf-8")
    for name in ("a.jsonl", "a.csv", "a.tsv"):
        assert read_table(tmp_path / name) == rows, name


@pytest.mark.parametrize(
    ("content", "name", "expected"),
    [
        (None, "missing.tsv", "does not exist"),
        (b"", "empty.tsv", "is empty"),
        (b"  \n\n", "blank.jsonl", "is empty"),
        (b"text\tlabel\n", "header.tsv", "no data rows"),
        (b"text\tlabel\nok\t1\ncaf\xe9\t0\n", "latin1.tsv", "offset 19"),
        (b'{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', "bad.jsonl", "line 2"),
        (b'{"text": "a"}\n[1, 2]\n', "list.jsonl", "line 2: expected a JSON object"),
        (b"text,label\na,1\nb,0,extra\n", "fields.csv", "line 3: 3 fields"),
        (b"text,label\n", "data.parquet", "unknown data format"),
    ],
)
def test_read_table_errors(tmp_path, content, name, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        read_table(path)


def test_find_column_fallback_and_error():
    rows = [{"sentence": "x", "label": "1"}]
    assert find_column(rows, "text", ("sentence",)) == "sentence"
    with pytest.raises(DataError, match="columns are: sentence, label"):
        find_column(rows, "review", (), "d.tsv")


def test_classification_labels_and_unknown_label(tok):
    rows = [{"text": "a", "label": "10"}, {"text": "b", "label": "9"}, {"text": "c", "label": "10"}]
    data = ClassificationData.from_rows(rows, tok)
    assert data.labels == ["9", "10"]  # integer labels in numeric order: id 0 is label 9
    assert [e.label for e in data.examples] == [1, 0, 1]
    assert data.examples[0].input_ids == tok("a")["input_ids"]
    with pytest.raises(DataError, match=r"labels '7' are not in the model's label set \(9, 10\)"):
        ClassificationData.from_rows([{"text": "x", "label": "7"}], tok, labels=data.labels)
    with pytest.raises(DataError, match="has one label"):
        ClassificationData.from_rows(rows[:1], tok)


def test_causal_lm_prompt_completion_masks_prompt(tok):
    rows = [{"prompt": "question one", "completion": "answer"}]
    data = CausalLMData.from_rows(rows, tok, prompt_column="prompt", completion_column="completion")
    (example,) = data.examples
    prompt = tok("question one")["input_ids"]
    completion = tok("answer", add_special_tokens=False)["input_ids"] + [tok.eos_token_id or tok.sep_token_id]
    completion = completion if tok.eos_token_id is not None else completion[:-1]
    assert example.input_ids == prompt + completion
    assert example.label == [IGNORE_INDEX] * len(prompt) + completion
    assert example.weight == len(completion)
    plain = CausalLMData.from_rows([{"text": "hello world"}], tok).examples[0]
    assert plain.label == plain.input_ids and plain.weight == len(plain.input_ids) - 1


def test_split_rows_is_seeded_partition():
    rows = make_rows(50)
    train, held = split_rows(rows, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert sorted(map(str, train + held)) == sorted(map(str, rows))
    assert split_rows(rows, 0.2, seed=3) == (train, held)
    with pytest.raises(DataError, match="between 0 and 1"):
        split_rows(rows, 1.5, 0)


def test_plan_epoch_covers_each_example_once_and_groups_lengths():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (1000,), generator=gen).tolist()
    grouped = plan_epoch(lengths, 16, seed=0, epoch=0)
    plain = plan_epoch(lengths, 16, seed=0, epoch=0, group_by_length=False)
    for plan in (grouped, plain):
        assert sorted(i for b in plan for i in b) == list(range(1000))
        assert sorted(len(b) for b in plan)[1:] == [16] * 62 and len(plan) == 63  # one short batch (1000 % 16)
    assert plan_epoch(lengths, 16, 0, 0) == grouped and plan_epoch(lengths, 16, 0, 1) != grouped

    def padded(plan):
        return sum(len(b) * max(lengths[i] for i in b) for b in plan)

    assert padded(grouped) < 0.7 * padded(plain)  # dynamic padding of grouped batches saves work
    assert max(lengths[i] for i in grouped[0]) == max(lengths)  # the longest batch runs first
    assert shard(list(range(7)), 1, 2) == [1, 3, 5]


def test_collate_pads_to_longest_in_batch(tok):
    data = CausalLMData.from_rows([{"text": "a b c d e"}, {"text": "f"}], tok)
    batch = collate(data.examples, pad_id=0)
    n0, n1 = (len(e.input_ids) for e in data.examples)
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()


def test_classification_metrics_against_hand_counts():
    preds, labels = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    # class 0: tp 1 fp 1 fn 1 -> f1 0.5; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: tp 2 fp 1 fn 0 -> 0.8
    got = classification_metrics(preds, labels)
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    lm = causal_lm_metrics(total_loss=6.0, tokens=3)
    assert lm == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2.0))}
