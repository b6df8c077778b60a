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
        if config.loraplus_lr_ratio is None:
            optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        else:
            groups = loraplus_groups(model, config.learning_rate, config.loraplus_lr_ratio, config.weight_decay)
            optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
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


# LoRA+ (Hayou et al. 2024, arXiv 2402.12354) as peft.optimizers.create_loraplus_optimizer builds
# it, so a run means the same as PEFT's: embedding LoRA at this fixed lr (PEFT's
# loraplus_lr_embedding default), since a B update on an embedding row is not the feature
# learning the ratio is tuned for.
LORAPLUS_EMBEDDING_LR = 1e-6


def loraplus_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """AdamW parameter groups of LoRA+, in PEFT's order: A matrices (and any other trainable
    matrix) at `lr`; LoRA on an embedding at LORAPLUS_EMBEDDING_LR; B matrices and 1-D
    parameters (biases, norms) at `lr` x `ratio`, with weight decay unless they are biases or
    norm weights (PEFT's loraplus_weight_decay is `weight_decay` here; 0 is its default)."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    from lorakit.core.layers.embedding import LoraEmbedding

    decay = {name for name in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in name}
    modules = dict(model.named_modules())
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = modules.get(".".join(name.split(".")[:-2]))
        if isinstance(owner, LoraEmbedding):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    return [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": LORAPLUS_EMBEDDING_LR},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * ratio},
    ]
