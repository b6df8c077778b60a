"""Checkpoints: everything a killed run needs to continue exactly, written atomically.

`DIR/checkpoint/state.pt` holds the trainable tensors, the optimizer, scheduler and grad
scaler states, the RNG states of torch / CUDA / python / numpy, the step (the data position:
batch plans are a pure function of seed and epoch) and the best-so-far bookkeeping.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorakit.atomic import replace_file
from lorakit.errors import UsageError

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    """The RNG states a training step draws from (dropout, shuffles)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train (LoRA A/B, saved heads, or all with full fine-tuning)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write `state` to out/checkpoint/state.pt via a temp file and os.replace: a run killed
    while writing leaves the previous checkpoint intact."""
    folder = out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    replace_file(folder / STATE_FILE, lambda tmp: torch.save(state, tmp))
    return folder / STATE_FILE


def load_checkpoint(out: Path) -> dict[str, Any]:
    """The state saved by save_checkpoint; UsageError when there is none to resume from."""
    path = out / CHECKPOINT_DIR / STATE_FILE
    if not path.is_file():
        raise UsageError(f"--resume: {out} has no checkpoint ({path}); train with --checkpoint-every N first")
    # Our own file, but it holds optimizer state and RNG tuples, so weights_only=False.
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed tensors back into the model's trainable parameters."""
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise UsageError(
            f"--resume: the checkpoint does not fit this model (no parameter {missing[0]}); "
            "resume with the same --model and adapter flags"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
