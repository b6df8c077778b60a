"""LoRA+ (--loraplus-lr-ratio): the AdamW groups match PEFT's create_loraplus_optimizer on the
same model (lrs, weight decay, which parameters), and the trainer's optimizer uses them."""

from __future__ import annotations

import pytest
import torch
from tiny import gpt2

import lorakit
from lorakit.core.config import LoraConfig
from lorakit.train import TrainConfig
from lorakit.train.batching import StepPlan
from lorakit.train.optimizer import LORAPLUS_EMBEDDING_LR, Optimization, loraplus_groups

peft = pytest.importorskip("peft")

TARGETS = ["c_attn", "c_fc", "wte"]  # linear layers and an embedding
SAVED = ["ln_f"]  # a norm trained in full: 1-D parameters


def lorakit_model():
    model = gpt2(seed=0)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS, modules_to_save=SAVED))
    return model


def peft_model():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=SAVED)
    return peft.get_peft_model(gpt2(seed=0), config)


def summary(groups):
    """Per group: lr, weight decay and the sorted parameter shapes (names differ between libraries)."""
    return [(g["lr"], g["weight_decay"], sorted(tuple(p.shape) for p in g["params"])) for g in groups]


def test_groups_match_peft_create_loraplus_optimizer():
    from peft.optimizers import create_loraplus_optimizer

    lr, ratio, decay = 1e-3, 16.0, 0.01
    theirs = create_loraplus_optimizer(
        peft_model(), torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=decay
    )
    ours = loraplus_groups(lorakit_model(), lr, ratio, decay)
    assert summary(ours) == summary(theirs.param_groups)
    # and against the definition: A at lr, embedding LoRA at PEFT's fixed lr, B and 1-D at ratio x lr
    lrs = [g["lr"] for g in ours]
    assert lrs == [lr, LORAPLUS_EMBEDDING_LR, lr * ratio, lr * ratio]
    a, emb, b, b_no_decay = summary(ours)
    assert all(s[0] == 4 for s in a[2]) and all(s[1] == 4 for s in b[2])  # A is (r, in), B is (out, r)
    assert emb[2] == [(4, 100), (32, 4)] and b_no_decay[1] == 0.0 and b_no_decay[2] == [(32,), (32,)]


def test_trainer_optimizer_uses_the_groups_and_schedules_each():
    model = lorakit_model()
    config = TrainConfig(train="t", out="o", lr=2e-3, loraplus_lr_ratio=8, warmup=0, max_steps=4)
    plan = StepPlan.of(config, [5] * 8, 1)
    opt = Optimization.create(model, config, plan, None)
    assert [g["lr"] for g in opt.optimizer.param_groups] == [2e-3, LORAPLUS_EMBEDDING_LR, 16e-3, 16e-3]
    for p in opt.params:
        p.grad = torch.zeros_like(p)
    opt.step()  # linear decay: every group keeps its ratio to A's lr
    a, _, b, _ = (g["lr"] for g in opt.optimizer.param_groups)
    assert b == pytest.approx(8 * a) and a == pytest.approx(2e-3 * 0.75)
    plain = Optimization.create(lorakit_model(), TrainConfig(train="t", out="o"), plan, None)
    assert len(plain.optimizer.param_groups) == 1  # without the flag: one group, as before


def test_loraplus_with_full_fine_tuning_is_refused():
    from lorakit.errors import UsageError

    with pytest.raises(UsageError, match="--loraplus-lr-ratio"):
        TrainConfig(train="t", out="o", full=True, loraplus_lr_ratio=16).validate()
    with pytest.raises(UsageError, match="must be positive"):
        TrainConfig(train="t", out="o", loraplus_lr_ratio=0).validate()
