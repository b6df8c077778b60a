"""The training loop from Python: accumulation, evaluation against Hugging Face's own loss,
learning, best adapter, early stopping, full fine-tuning, causal LM."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_train_fixtures import bert_dir, cls_files, gpt_dir, make_rows, write_jsonl  # noqa: F401
from tiny import bert, gpt2

import lorakit
from lorakit.train import TrainConfig, evaluate, train
from lorakit.train.data import CausalLMData, ClassificationData, Example


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(out, model, files, **kw):
    base = {"model": str(model), "train": str(files[0]), "eval": str(files[1]), "out": str(out), "progress": False}
    base.update(log_every=1, batch_size=8, max_steps=4)
    base.update(kw)
    return train(TrainConfig(**base))


def test_accumulation_gives_the_same_steps(tmp_path, bert_dir, cls_files):  # noqa: F811
    run(tmp_path / "a", bert_dir, cls_files, batch_size=8, grad_accum=1, lr=1e-2)
    run(tmp_path / "b", bert_dir, cls_files, batch_size=4, grad_accum=2, lr=1e-2)
    la = [r["loss"] for r in records(tmp_path / "a")]
    lb = [r["loss"] for r in records(tmp_path / "b")]
    assert len(la) == 4 and la == pytest.approx(lb, abs=1e-5)
    assert len(set(la)) > 1  # the steps really changed the model
    _, ta, _ = lorakit.read_adapter(tmp_path / "a" / "adapter")
    _, tb, _ = lorakit.read_adapter(tmp_path / "b" / "adapter")
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=1e-5, rtol=1e-4)


def test_evaluate_matches_hugging_face_loss():
    model = bert(seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(1, 100, (n,), generator=gen).tolist(), n % 3) for n in (3, 9, 5, 12, 4)]
    data = ClassificationData(examples, ["a", "b", "c"])
    got = evaluate(model, SimpleNamespace(pad_token_id=0), data, batch_size=2, return_predictions=True)
    with torch.no_grad():  # reference: one example at a time, no padding at all
        outs = [model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.label])) for e in examples]
    assert got["loss"] == pytest.approx(sum(o.loss.item() for o in outs) / 5, abs=1e-5)
    assert got["predictions"] == [o.logits.argmax().item() for o in outs]
    lm = gpt2(seed=0).eval()
    texts = [torch.randint(1, 100, (n,), generator=gen).tolist() for n in (4, 11, 7)]
    lm_data = CausalLMData([Example(t, list(t)) for t in texts])
    got = evaluate(lm, SimpleNamespace(pad_token_id=0), lm_data, batch_size=3)
    with torch.no_grad():
        sums = [lm(input_ids=torch.tensor([t]), labels=torch.tensor([t])).loss.item() * (len(t) - 1) for t in texts]
    assert got["loss"] == pytest.approx(sum(sums) / sum(len(t) - 1 for t in texts), abs=1e-5)


def test_lora_learns_keeps_best_adapter_and_stops_early(tmp_path, bert_dir, cls_files):  # noqa: F811
    out = tmp_path / "run"
    # a random tiny BERT knows no words: the embeddings train too (a LoRA-only run learns the task slowly)
    summary = run(
        out,
        bert_dir,
        cls_files,
        max_steps=80,
        eval_every=5,
        early_stopping=3,
        lr=1e-2,
        rank=8,
        targets="query,key,value,dense",
        modules_to_save=["word_embeddings"],
    )
    recs = records(out)
    evals = [r for r in recs if "eval_accuracy" in r]
    best = max(evals, key=lambda r: (r["eval_accuracy"], -r["eval_loss"]))  # a tie goes to the lower loss
    assert best["eval_accuracy"] >= 0.6  # three balanced classes: chance is 1/3
    assert summary["best_step"] == best["step"] and summary["best_eval"]["accuracy"] == best["eval_accuracy"]
    # the adapter on disk is the best one, not the last: reloading it gives the best step's metrics
    from lorakit.train.model import load_model, load_tokenizer

    tok = load_tokenizer(bert_dir)
    dev = ClassificationData.from_rows(
        [
            dict(zip(("text", "label"), ln.split("\t"), strict=True))
            for ln in cls_files[1].read_text().split("\n")[1:-1]
        ],
        tok,
        labels=["neg", "neu", "pos"],
    )
    model = lorakit.load_adapter(load_model(bert_dir, "classify", ["neg", "neu", "pos"]), out / "adapter")
    assert evaluate(model, tok, dev)["accuracy"] == pytest.approx(best["eval_accuracy"])
    assert summary["steps"] < 80  # stopped early: the last `patience` evals did not improve
    assert all(r["eval_accuracy"] <= best["eval_accuracy"] for r in evals[-3:])
    # patience counts from the first eval at the best accuracy (a tie won on loss is no improvement)
    first_best = max(evals, key=lambda r: r["eval_accuracy"])
    assert evals[-4]["step"] >= first_best["step"] and summary["steps"] == evals[-1]["step"] == first_best["step"] + 15
    assert (out / "loss.png").stat().st_size > 1000 and not (out / "checkpoint").exists()
    assert summary["trainable_params"] == sum(t.numel() for t in lorakit.read_adapter(out / "adapter")[1].values())


def test_full_fine_tuning_saves_a_plain_model(tmp_path, bert_dir, cls_files):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    summary = run(tmp_path / "full", bert_dir, cls_files, full=True, max_steps=3, lr=1e-3, eval_every=1)
    assert summary["trainable_params"] == summary["total_params"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full" / "model")
    from lorakit.train.model import load_tokenizer

    tok = load_tokenizer(tmp_path / "full" / "model")
    dev = ClassificationData.from_rows(make_rows(30, 1), tok, labels=["neg", "neu", "pos"])
    assert evaluate(model, tok, dev)["loss"] == pytest.approx(summary["best_eval"]["loss"], abs=1e-5)  # the best
    assert sorted(p.name for p in (tmp_path / "full").iterdir() if p.name.startswith(".")) == []


def test_causal_lm_prompt_completion_run_and_eval_command(tmp_path, gpt_dir, capsys):  # noqa: F811
    rows = [{"prompt": f"say {w}", "completion": f"{w} {w}"} for w in ("good", "bad", "door", "sad", "fine") * 4]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "lm"
    config = TrainConfig(
        model=str(gpt_dir),
        task="causal-lm",
        train=str(train_file),
        eval_split=0.25,
        out=str(out),
        lr=1e-2,
        prompt_column="prompt",
        completion_column="completion",
        max_steps=6,
        batch_size=4,
        progress=False,
    )
    summary = train(config)
    first, last = records(out)[0], summary["final_eval"]
    assert last["perplexity"] == pytest.approx(torch.tensor(last["loss"]).exp().item(), rel=1e-5)
    assert first["loss"] > 0 and json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == (
        "CAUSAL_LM"
    )
    from lorakit.cli import main

    held = write_jsonl(tmp_path / "held.jsonl", rows[:5])
    code = main(
        [
            "eval",
            "--model",
            str(gpt_dir),
            "--adapter",
            str(out),
            "--data",
            str(held),
            "--json",
            "--prompt-column",
            "prompt",
            "--completion-column",
            "completion",
        ]
    )
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and got["task"] == "causal-lm" and got["examples"] == 5 and got["loss"] > 0


def test_early_stopping_stops_after_patience(tmp_path, bert_dir, cls_files):  # noqa: F811
    # lr so small that the eval accuracy cannot change: evals 2 and 3 do not improve on eval 1
    summary = run(tmp_path / "es", bert_dir, cls_files, max_steps=20, eval_every=1, early_stopping=2, lr=1e-12)
    assert summary["steps"] == 3 and summary["best_step"] == 1
    assert [r["step"] for r in records(tmp_path / "es")] == [1, 2, 3]


def test_max_length_is_capped_by_the_model(tmp_path, gpt_dir):  # noqa: F811
    # the tiny GPT has 128 positions: a longer example would index past its position table
    long_text = " ".join(["good movie"] * 150)
    train_file = write_jsonl(tmp_path / "long.jsonl", [{"text": long_text}] * 4)
    config = TrainConfig(
        model=str(gpt_dir),
        task="causal-lm",
        train=str(train_file),
        out=str(tmp_path / "o"),
        max_length=1000,
        max_steps=1,
        batch_size=2,
        progress=False,
    )
    summary = train(config)
    assert summary["steps"] == 1 and config.max_length == 128


def test_non_finite_loss_stops_with_advice(tmp_path, bert_dir, cls_files, monkeypatch):  # noqa: F811
    import lorakit.train.loop as loop
    from lorakit.errors import UsageError

    real = loop.loss_sum
    monkeypatch.setattr(loop, "loss_sum", lambda logits, labels: real(logits, labels) * float("nan"))
    with pytest.raises(UsageError, match="loss became nan at step 1: lower --lr"):
        run(tmp_path / "nan", bert_dir, cls_files)
    assert not (tmp_path / "nan" / "summary.json").exists()
