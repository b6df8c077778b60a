"""Which computation a linear LoRA layer's forward runs, decided in one place.

`choose_forward_path(layer, x)` returns the ForwardPath; `LoraLinear.forward_along(path, x,
names)` runs it. Every path computes the same function (up to rounding); they differ in cost
and in what autograd sees. Tests assert on the plan rather than spying on private methods.
"""

from __future__ import annotations

import enum

import torch

from lorakit.core import functional as LF


class ForwardPath(enum.Enum):
    """The computations a linear LoRA layer's forward can run."""

    BASE = "base"  # base_layer(x): nothing to add (disabled, no active adapter, all merged)
    MERGED_WEIGHT = "merged_weight"  # one matmul with the cached W + dW of every pending adapter
    FUSED_TRAIN = "fused_train"  # the variant's hand-written autograd function (one adapter)
    FACTORED = "factored"  # base_layer(x) + each adapter's term (dropout, DoRA's reference maths)


def choose_forward_path(layer, x: torch.Tensor, names: list[str] | None = None) -> ForwardPath:
    """The path `layer` (a LoraLinear) takes for input x with the unmerged adapters `names`
    (default: its pending ones, i.e. active, not merged, not disabled).

    The first matching row wins:

    ============================================================  ==============
    condition                                                     path
    ============================================================  ==============
    no adapter to add (disabled, none active, all merged)         BASE
    training with LoRA dropout on for some adapter                FACTORED
    base weight quantized (4-bit: no dense W to add dW to)        FACTORED
    few tokens (forming W + dW costs more than the factored sum)  FACTORED
    no gradient needed (torch.no_grad / inference_mode)           MERGED_WEIGHT
    several adapters, or the base weight itself trains            FACTORED
    adapter dtype != base dtype (fp32 adapter over half base)     FACTORED
    autocast on (its dtype choices are not in the hand backward)  FACTORED
    the variant has no fused function here (plain LoRA on a       FACTORED
    loralib fused enable_lora layer)
    otherwise                                                     FUSED_TRAIN
    ============================================================  ==============

    The same rows hold for plain LoRA and DoRA (FUSED_TRAIN is FusedLoraMatmul or
    DoraLinearFunction; FACTORED adds DoRA's PEFT maths with autograd).
    """
    names = layer._pending if names is None else names
    if not names:
        return ForwardPath.BASE
    if layer.training and any(layer.dropout_p[n] for n in names):
        return ForwardPath.FACTORED
    tokens = x.numel() // x.shape[-1]
    if layer.quantized or not LF.worth_merging_on_the_fly(tokens, layer.in_features, layer.out_features):
        return ForwardPath.FACTORED
    if not torch.is_grad_enabled():
        return ForwardPath.MERGED_WEIGHT
    return ForwardPath.FUSED_TRAIN if _fused_train_applies(layer, x, names) else ForwardPath.FACTORED


def _fused_train_applies(layer, x: torch.Tensor, names: list[str]) -> bool:
    if len(names) != 1 or layer.base_layer.weight.requires_grad:
        return False
    name = names[0]
    if layer.lora_A[name].dtype != layer.base_layer.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return False
    return layer.variants[name].has_fused_train(layer)
