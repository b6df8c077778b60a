"""RunStats and StepPlan, the Trainer's typed state: a checkpoint's "book" reads back to the very
same JSON older lorakit wrote, evaluations pick the best as the task's metric says, and the step
plan is plan_epoch's batches cut into micro-batches, the same examples for any split."""

from __future__ import annotations

import json

import pytest

from lorakit.train import TrainConfig
from lorakit.train.batching import StepPlan, plan_epoch
from lorakit.train.stats import RunStats

# The "book" of a state.json as lorakit wrote it before RunStats (its dict, in its key order).
LEGACY_BOOK = {
    "best": 0.5,
    "best_step": 4,
    "bad_evals": 1,
    "train_time": 1.25,
    "win_loss": 3.5,
    "win_weight": 7,
    "win_examples": 7,
    "win_time": 0.5,
    "examples": 48,
    "best_eval": {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.1},
}
FRESH_BOOK = {k: v for k, v in LEGACY_BOOK.items() if k != "best_eval"} | {"best": None, "best_step": None}


@pytest.mark.parametrize("book", [LEGACY_BOOK, FRESH_BOOK])
def test_a_checkpoint_book_reads_back_to_the_same_json(book):
    stats = RunStats.from_book(json.loads(json.dumps(book)))
    assert json.dumps(stats.to_book()) == json.dumps(book)


def test_a_fresh_run_writes_the_book_older_lorakit_started_with():
    old_start = {"best": None, "best_step": None, "bad_evals": 0, "train_time": 0.0}
    old_start.update({"win_loss": 0.0, "win_weight": 0, "win_examples": 0, "win_time": 0.0, "examples": 0})
    assert json.dumps(RunStats().to_book()) == json.dumps(old_start)


@pytest.mark.parametrize("higher, values, best_step", [(True, [0.5, 0.7, 0.6], 2), (False, [0.5, 0.7, 0.6], 1)])
def test_the_best_evaluation_follows_the_metric_direction(higher, values, best_step):
    stats = RunStats()
    improved = [stats.record_eval(step, {"m": v}, v, higher) for step, v in enumerate(values, 1)]
    assert stats.best_step == best_step and stats.best == values[best_step - 1]
    assert stats.best_eval == {"m": values[best_step - 1]}
    assert improved == [step == 1 or (step == best_step) for step in (1, 2, 3)]
    assert stats.bad_evals == len(values) - best_step


def test_the_log_window_is_a_weighted_mean_and_restarts():
    stats = RunStats()
    stats.add_step(loss=6.0, weight=4, examples=4, seconds=2.0)
    stats.add_step(loss=2.0, weight=4, examples=4, seconds=2.0)
    assert stats.window() == (1.0, 2.0)
    stats.reset_window()
    stats.add_step(loss=3.0, weight=2, examples=2, seconds=1.0)
    assert stats.window() == (1.5, 2.0)
    assert (stats.examples, stats.train_time) == (10, 5.0)


def test_the_step_plan_cuts_each_epochs_batches_into_micro_batches():
    lengths = [(i * 7) % 13 + 1 for i in range(30)]
    config = TrainConfig(train="t", out="o", batch_size=4, grad_accum=2, seed=3, epochs=2, warmup=0.25)
    plan = StepPlan.of(config, lengths, world=1)
    assert (plan.step_size, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (8, 4, 8, 2)
    for epoch in range(2):
        expected = plan_epoch(lengths, 8, 3, epoch, True)
        for index, examples in enumerate(expected):
            micro = plan.micro_batches(epoch * 4 + index + 1)
            assert [i for batch in micro for i in batch] == examples
            assert all(len(batch) <= 4 for batch in micro)


def test_the_steps_examples_do_not_depend_on_the_split():
    lengths = list(range(1, 41))
    one = StepPlan.of(TrainConfig(train="t", out="o", batch_size=8, max_steps=7, warmup=3), lengths, world=1)
    split = StepPlan.of(TrainConfig(train="t", out="o", batch_size=2, grad_accum=2, max_steps=7), lengths, world=2)
    assert (one.total_steps, one.warmup_steps, split.global_batch) == (7, 3, 4)
    for step in range(1, 8):
        assert sum(one.micro_batches(step), []) == sum(split.micro_batches(step), [])
