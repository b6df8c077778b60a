"""PiSSA CONVERSION: a trained PiSSA adapter as a plain LoRA file for the original base.
(The initialisation itself is variants/pissa_init.py.)

A PiSSA adapter (LoraConfig(init="pissa")) trains against the residual base W_res = W0 - s B0 A0,
so its file is useless to someone holding the unmodified W0 (PEFT, vLLM, another lorakit).
Since W_res + s B A = W0 + s (B A - B0 A0), the trained update is exactly a LoRA of rank 2r
on the original base:

    A' = [A; A0]  (2r, in)        B' = [B, -B0]  (out, 2r)        same scaling s

(PEFT's `path_initial_model_for_weight_conversion`). The rank doubles, so alpha (and the rank
and alpha patterns) are adjusted to keep s. The initial factors come from the layers (kept
by the PiSSA initialisation) or from an adapter folder saved right after initialisation.
"""

from __future__ import annotations

import dataclasses
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from lorakit.core.config import LoraConfig
from lorakit.core.inject import adapter_configs, lora_layers
from lorakit.core.layers import LoraLinear
from lorakit.errors import UsageError
from lorakit.files.peft_format import read_adapter, save_adapter
from lorakit.variants.base import LORA


def doubled_rank_config(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r adapter with the same scaling as `config` in every module."""
    factor = math.sqrt(2) if config.use_rslora else 2.0  # alpha/sqrt(2r) or alpha/(2r) == before
    return dataclasses.replace(
        config,
        r=2 * config.r,
        alpha=config.alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
        init="kaiming",  # the file holds plain LoRA factors; nothing is re-initialised on load
    )


def initial_factors(
    model: nn.Module, adapter_name: str = "default", initial: str | os.PathLike | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A0, B0) of every layer of PiSSA adapter `adapter_name`, by module name: from the
    layers themselves, or from the adapter folder `initial` saved before training."""
    layers = [(n, m) for n, m in lora_layers(model) if adapter_name in m.lora_A]
    if not layers:
        raise UsageError(f"model has no adapter {adapter_name!r}; loaded: {sorted(adapter_configs(model)) or 'none'}")
    if initial is not None:
        _, tensors, _ = read_adapter(initial)
        found = {}
        for name, layer in layers:
            key_A, key_B = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            if key_A not in tensors or key_B not in tensors:
                raise UsageError(f"{initial} has no factors for {name}: give the adapter saved right after PiSSA init")
            A0, B0 = tensors[key_A], tensors[key_B]
            if A0.shape != layer.lora_A[adapter_name].shape or B0.shape != layer.lora_B[adapter_name].shape:
                raise UsageError(
                    f"{initial}: {name}'s factors have shapes {tuple(A0.shape)}, {tuple(B0.shape)}, the adapter "
                    f"{tuple(layer.lora_A[adapter_name].shape)}, {tuple(layer.lora_B[adapter_name].shape)}: "
                    "give the adapter saved right after PiSSA init"
                )
            found[name] = (A0, B0)
        return found
    missing = [n for n, m in layers if adapter_name not in getattr(m, "pissa_initial", {})]
    if missing:
        raise UsageError(
            f"adapter {adapter_name!r} was not initialised with PiSSA in this process ({missing[0]} has no initial "
            "factors): pass initial=<the adapter folder saved right after initialisation>"
        )
    return {n: m.pissa_initial[adapter_name] for n, m in layers}


@contextmanager
def _as_plain_lora(model: nn.Module, adapter_name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Within the block, adapter `adapter_name` is the rank-2r LoRA over the original base."""
    layers = dict(lora_layers(model))
    configs = adapter_configs(model)
    config = configs[adapter_name]
    saved = []
    try:
        for name, (A0, B0) in factors.items():
            layer = layers[name]
            if not isinstance(layer, LoraLinear) or layer.variants[adapter_name] is not LORA or layer.merged:
                raise UsageError(
                    f"{name}: only unmerged plain (non-DoRA) linear PiSSA adapters convert to LoRA; unmerge first"
                )
            A, B, weight = layer.lora_A[adapter_name], layer.lora_B[adapter_name], layer.base_layer.weight
            saved.append((layer, A, B, weight, layer.rank[adapter_name]))
            with torch.no_grad():
                A0, B0 = A0.to(A.device, A.dtype), B0.to(B.device, B.dtype)
                layer.lora_A[adapter_name] = nn.Parameter(torch.cat([A.detach(), A0]), requires_grad=False)
                layer.lora_B[adapter_name] = nn.Parameter(torch.cat([B.detach(), -B0], dim=1), requires_grad=False)
                layer.rank[adapter_name] = 2 * A.shape[0]
                # The original base W_res + s B0 A0, so the file's fingerprint is that of W0.
                initial = B0.to(weight.dtype) @ A0.to(weight.dtype)
                initial = initial.t() if layer.fan_in_fan_out else initial
                original = weight.detach() + layer.scaling[adapter_name] * initial
                layer.base_layer.weight = nn.Parameter(original, requires_grad=False)
        configs[adapter_name] = doubled_rank_config(config)
        yield
    finally:
        configs[adapter_name] = config
        for layer, A, B, weight, rank in saved:
            layer.lora_A[adapter_name], layer.lora_B[adapter_name] = A, B
            layer.base_layer.weight, layer.rank[adapter_name] = weight, rank
            layer.refresh_caches()


def save_pissa_as_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    initial: str | os.PathLike | None = None,
) -> Path:
    """Save PiSSA adapter `adapter_name` as a plain rank-2r LoRA for the ORIGINAL base model
    (PEFT, vLLM and lorakit load it on the unmodified W0); the model is left as it was."""
    factors = initial_factors(model, adapter_name, initial)
    with _as_plain_lora(model, adapter_name, factors):
        return save_adapter(model, path, adapter_name)


__all__ = ["doubled_rank_config", "initial_factors", "save_pissa_as_lora"]
