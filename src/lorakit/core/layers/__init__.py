"""LoRA layer families and the dispatcher that picks one for a module."""

from __future__ import annotations

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from lorakit.core.layers.base import LoraLayer
from lorakit.core.layers.conv import LoraConv
from lorakit.core.layers.embedding import LoraEmbedding
from lorakit.core.layers.linear import LoraLinear
from lorakit.core.layers.saved import SavedModule, adapter_copy, plain_module

# Module type -> LoRA layer family; the first match wins.
DISPATCH: list[tuple[tuple[type, ...], type[LoraLayer]]] = [
    ((nn.Linear, Conv1D), LoraLinear),
    ((nn.Embedding,), LoraEmbedding),
    ((nn.Conv1d, nn.Conv2d), LoraConv),
]
SUPPORTED = "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d"


def layer_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer family for `module`, or None if it cannot be adapted."""
    if isinstance(module, LoraLayer):
        return type(module)
    for types, cls in DISPATCH:
        if isinstance(module, types):
            return cls
    return None


def is_linear(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return isinstance(base, nn.Linear | Conv1D)


__all__ = [
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv",
    "SavedModule",
    "plain_module",
    "adapter_copy",
    "layer_class_for",
    "is_linear",
    "SUPPORTED",
]
