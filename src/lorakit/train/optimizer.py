"""Optimization: AdamW, its warm-up / decay schedule and the fp16 grad scaler, stepped as one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lorakit.train.batching import StepPlan
from lorakit.train.config import TrainConfig
from lorakit.train.prepare import lr_lambda


@dataclass
class Optimization:
    """What turns gradients into an update; its state is what a checkpoint saves beside the weights."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None  # fp16 only
    max_grad_norm: float  # 0 = no clipping

    @classmethod
    def create(cls, model: nn.Module, config: TrainConfig, plan: StepPlan, autocast: torch.dtype | None):
        """AdamW over `model`'s trainable parameters with `config`'s lr, schedule and clipping."""
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        schedule = lr_lambda(config.schedule, plan.warmup_steps, plan.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        scaler = torch.amp.GradScaler("cuda") if autocast is torch.float16 else None
        return cls(params, optimizer, scheduler, scaler, config.max_grad_norm)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward() on (scaled up under fp16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def step(self) -> float:
        """Unscale (fp16), clip, step, advance the schedule, clear the gradients; the lr just used."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def state(self) -> dict[str, Any]:
        """The checkpoint's "optimizer", "scheduler" and "scaler" entries."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore what state() saved."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
