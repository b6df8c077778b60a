"""Small-data defaults (a run long enough to learn when neither --epochs nor --max-steps is set;
accuracy ties between evaluations go to the lower eval loss), --gradient-checkpointing (same
gradients, the model's checkpointing on) and the new flags as --config keys."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import llama

import lorakit
from lorakit.cli import main
from lorakit.core.config import LoraConfig
from lorakit.train import TrainConfig
from lorakit.train.batching import MAX_AUTO_EPOCHS, MIN_AUTO_STEPS, StepPlan, auto_epochs
from lorakit.train.loop import Trainer
from lorakit.train.model import enable_gradient_checkpointing
from lorakit.train.stats import RunStats


def plan(n, **settings):
    return StepPlan.of(TrainConfig(train="t", out="o", batch_size=32, **settings), [8] * n, 1)


def test_170_examples_train_at_least_100_steps_in_whole_epochs():
    p = plan(170)  # 6 steps per epoch: one epoch would stop at the majority class
    assert (p.steps_per_epoch, p.epochs, p.total_steps) == (6, 17, 102)
    assert p.total_steps >= MIN_AUTO_STEPS and p.total_steps - p.steps_per_epoch < MIN_AUTO_STEPS
    assert "17 epochs (102 steps" in p.length_note()


def test_the_user_setting_or_large_data_keeps_one_epoch_or_what_was_asked():
    assert plan(170, epochs=1).total_steps == 6 and plan(170, epochs=1).length_note() is None
    assert plan(170, max_steps=9).total_steps == 9
    assert plan(32 * 150).total_steps == 150 and plan(32 * 150).length_note() is None  # >= 100 steps: 1 epoch
    assert plan(5).total_steps == MAX_AUTO_EPOCHS  # one step per epoch: capped, not 100 passes
    assert [auto_epochs(n) for n in (1, 6, 99, 100, 500)] == [MAX_AUTO_EPOCHS, 17, 2, 1, 1]
    assert all(math.ceil(MIN_AUTO_STEPS / n) >= auto_epochs(n) for n in range(1, 200))


def test_the_trainer_prints_the_chosen_length_in_one_line(tmp_path, capsys):
    data = tmp_path / "texts.tsv"
    data.write_text("text\n" + "".join(f"a short text number {i}\n" for i in range(170)), encoding="utf-8")
    trainer = Trainer(TrainConfig(train=str(data), out=str(tmp_path / "run"), task="causal-lm"))
    assert trainer.plan.total_steps == 102
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorakit train:")]
    assert lines == [trainer.plan.length_note()] and "6 steps per epoch" in lines[0]


def test_an_accuracy_tie_keeps_the_lower_loss_but_does_not_reset_patience():
    stats = RunStats()
    assert stats.record_eval(5, {"accuracy": 0.6, "loss": 0.9}, 0.6, True)
    assert stats.record_eval(10, {"accuracy": 0.6, "loss": 0.7}, 0.6, True)  # tie, lower loss: the new best
    assert (stats.best_step, stats.best_eval["loss"], stats.bad_evals) == (10, 0.7, 1)
    assert not stats.record_eval(15, {"accuracy": 0.6, "loss": 0.8}, 0.6, True)  # tie, higher loss
    assert not stats.record_eval(20, {"accuracy": 0.5, "loss": 0.1}, 0.5, True)  # lower accuracy
    assert (stats.best_step, stats.bad_evals) == (10, 3)
    assert stats.record_eval(25, {"accuracy": 0.7, "loss": 2.0}, 0.7, True) and stats.bad_evals == 0
    resumed = RunStats.from_book(json.loads(json.dumps(stats.to_book())))  # the tie rule survives --resume
    assert resumed.record_eval(30, {"accuracy": 0.7, "loss": 1.0}, 0.7, True) and resumed.best_step == 30


def lora_llama():
    model = llama(seed=0)
    lorakit.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    return model


def lora_grads(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    ids = torch.randint(1, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = lora_grads(lora_llama(), ids)
    model = lora_llama()
    enable_gradient_checkpointing(model)
    assert model.is_gradient_checkpointing and not model.config.use_cache
    checkpointed = lora_grads(model, ids)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
        assert plain[name].abs().sum() > 0 or "lora_B" not in name


def test_new_flags_work_as_config_keys(tmp_path):
    chat = tmp_path / "chat.jsonl"
    turns = [[{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}] for i in range(12)]
    chat.write_text("".join(json.dumps({"messages": t}) + "\n" for t in turns), encoding="utf-8")
    config = tmp_path / "run.toml"
    config.write_text(
        f'task = "causal-lm"\ntrain = "{chat}"\nout = "{tmp_path / "run"}"\nmax-steps = 2\nbatch_size = 4\n'
        "train-on-prompt = true\npacking = true\ngradient_checkpointing = true\nloraplus-lr-ratio = 16\n"
        "max-length = 64\nprogress = false\n",
        encoding="utf-8",
    )
    assert main(["train", "--config", str(config)]) == 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["train_on_prompt"], saved["packing"], saved["gradient_checkpointing"]) == (True, True, True)
    assert saved["loraplus_lr_ratio"] == 16 and saved["max_length"] == 64
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["packed_rows"] < len(turns) and summary["steps"] == 2


@pytest.mark.parametrize("flag", ["--packing", "--train-on-prompt"])
def test_causal_lm_flags_are_refused_for_classify(flag):
    from lorakit.errors import UsageError

    with pytest.raises(UsageError, match=f"{flag} is for --task causal-lm"):
        TrainConfig.from_args({"train": "t", "out": "o", flag[2:].replace("-", "_"): True}).validate()
