"""Where lorakit keeps per-model state that is not a parameter: the LoraConfig of each
injected adapter, and the base values of parameters adapters change in place.

Both live in the model's instance `__dict__` under a fixed name (CONFIGS_ATTR,
BASE_VALUES_ATTR), never as registered buffers: they must not appear in state_dict() or
save_pretrained, but they follow the model through copy.deepcopy and pickling, as any
instance attribute does. Read and write them only through these functions.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lorakit.core.config import LoraConfig

CONFIGS_ATTR = "_lorakit_configs"
BASE_VALUES_ATTR = "_lorakit_base_values"  # [(base parameter, its value before any adapter)]


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters injected into `model`, by adapter name (a live dict: an
    empty one is created on first use)."""
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def set_adapter_config(model: nn.Module, name: str, config: LoraConfig) -> None:
    adapter_configs(model)[name] = config


def forget_adapter_configs(model: nn.Module) -> None:
    """Drop every adapter config (after unload / merge_and_unload: no adapter is left)."""
    model.__dict__.pop(CONFIGS_ATTR, None)


def base_values(model: nn.Module, create: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The stashed (parameter, value before any adapter) pairs; `create` keeps a new empty
    list on the model, otherwise an absent stash reads as empty."""
    if create:
        return model.__dict__.setdefault(BASE_VALUES_ATTR, [])
    return model.__dict__.get(BASE_VALUES_ATTR, [])


def forget_base_values(model: nn.Module) -> None:
    """Drop the stash: the present values of those parameters are the base again."""
    model.__dict__.pop(BASE_VALUES_ATTR, None)
