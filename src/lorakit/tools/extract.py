"""A LoRA adapter from a fully fine-tuned model: truncated SVD of each layer's weight change.

For every targeted linear layer dW = W_tuned - W_base is factored as U S V^T and its best rank-r
approximation (Eckart-Young) is stored as B = U_r S_r, A = V_r^T with alpha = r, so the
scaling is 1 and B @ A is exactly that approximation. The share of dW's energy kept,
sum(kept sigma^2) / ||dW||_F^2, is reported per layer; the relative Frobenius error of the
layer's update is sqrt(1 - energy).

Changes LoRA cannot express are carried in full, as PEFT does: a non-target module whose own
parameters changed (a classifier head, layer norms, embeddings) goes to modules_to_save, and
changed biases of target layers are saved with bias="lora_only". At full rank the extracted
adapter reproduces the tuned model (up to float rounding).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm import tqdm
from transformers.pytorch_utils import Conv1D

from lorakit.core.config import LoraConfig
from lorakit.core.inject import find_targets, inject, lora_layers
from lorakit.errors import DataError, UsageError


@dataclass
class LayerReport:
    """What the extraction kept of one layer's weight change."""

    name: str
    shape: tuple[int, int]
    rank: int
    energy: float  # sum of kept sigma^2 / sum of all sigma^2 (1.0 for an unchanged layer)
    rel_error: float  # ||dW - B A||_F / ||dW||_F = sqrt(1 - energy)
    delta_norm: float  # ||dW||_F

    def as_dict(self) -> dict:
        return asdict(self)


def low_rank_factors(
    delta: torch.Tensor, rank: int, method: str = "exact", generator_seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, energy) with B @ A the best rank-`rank` approximation of `delta` (d_out, d_in).

    method "exact" uses a full SVD (float64); "lowrank" uses torch.svd_lowrank (randomized,
    faster for big layers, near-optimal). energy = kept sigma^2 / ||delta||_F^2.
    """
    if method not in ("exact", "lowrank"):
        raise UsageError(f"svd method {method!r} is not known: use 'exact' or 'lowrank'")
    work = delta.detach().to(torch.float64)
    rank = min(rank, *work.shape)
    total = float(work.pow(2).sum())
    if method == "exact" or rank >= min(work.shape) - 2:
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        state = torch.random.get_rng_state()
        torch.manual_seed(generator_seed)  # a reproducible adapter from the same inputs
        try:
            U, S, V = torch.svd_lowrank(work, q=min(rank + 10, *work.shape), niter=4)
        finally:
            torch.random.set_rng_state(state)
        U, S, Vh = U[:, :rank], S[:rank], V[:, :rank].t()
    energy = float(S.pow(2).sum()) / total if total > 0 else 1.0
    return U * S, Vh, min(energy, 1.0)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (d_out, d_in), whatever the layer stores (Conv1D keeps (d_in, d_out))."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _check_same_architecture(base: nn.Module, tuned: nn.Module) -> None:
    base_shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    tuned_shapes = {k: tuple(v.shape) for k, v in tuned.state_dict().items()}
    if base_shapes != tuned_shapes:
        only_base = sorted(set(base_shapes) - set(tuned_shapes))[:3]
        only_tuned = sorted(set(tuned_shapes) - set(base_shapes))[:3]
        resized = [k for k in base_shapes.keys() & tuned_shapes.keys() if base_shapes[k] != tuned_shapes[k]][:3]
        raise DataError(
            "the tuned model is not a fine-tune of the base (different parameters: "
            f"only in base {only_base}, only in tuned {only_tuned}, other shapes {resized}); "
            "give the base checkpoint the tuned model was trained from"
        )


def extract_adapter(
    base: nn.Module,
    tuned: nn.Module,
    rank: int,
    targets: list[str] | str = "all-linear",
    *,
    adapter_name: str = "default",
    method: str = "exact",
    keep_other_changes: bool = True,
    progress: bool = False,
) -> tuple[nn.Module, list[LayerReport]]:
    """Inject into `base` an adapter approximating `tuned` - `base`; return (base, report).

    `base` is changed in place: LoRA layers on `targets` hold the rank-`rank` factors of each
    layer's change and, with `keep_other_changes`, changed non-target modules and target
    biases take the tuned values and are saved with the adapter (`lorakit.save_adapter`).
    Layers smaller than `rank` get their full rank (recorded in rank_pattern).
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise UsageError(f"rank={rank!r}: must be a positive integer (e.g. 8)")
    if lora_layers(base) or lora_layers(tuned):
        raise UsageError("extract needs plain models: the base or the tuned model already has LoRA layers")
    _check_same_architecture(base, tuned)
    found = find_targets(base, LoraConfig(target_modules=targets))
    not_linear = [f"{n} ({type(m).__name__})" for n, m in found if not isinstance(m, nn.Linear | Conv1D)]
    if not_linear:
        raise UsageError(
            f"extract factors linear layers only; targets include {', '.join(not_linear[:4])}: "
            "name linear layers (or use all-linear)"
        )
    tuned_modules = dict(tuned.named_modules())
    factors, report, ranks = {}, [], {}
    for name, module in tqdm(found, desc="extract (SVD per layer)", disable=not progress, leave=False):
        delta = _dense_weight(tuned_modules[name]) - _dense_weight(module)
        B, A, energy = low_rank_factors(delta, rank, method)
        factors[name] = (A, B)
        ranks[name] = A.shape[0]
        norm = float(delta.detach().double().norm())
        report.append(
            LayerReport(name, tuple(delta.shape), A.shape[0], energy, math.sqrt(max(0.0, 1.0 - energy)), norm)
        )

    target_names = {n for n, _ in found}
    changed_modules, changed_biases = [], []
    if keep_other_changes:
        changed_modules, changed_biases = _other_changes(base, tuned_modules, target_names)
    # Layers smaller than `rank` keep their full rank; alpha = rank everywhere: scaling 1.
    small = {re.escape(n): r for n, r in ranks.items() if r != rank}
    config = LoraConfig(
        r=rank,
        alpha=rank,
        target_modules=targets,
        modules_to_save=changed_modules or None,
        bias="lora_only" if changed_biases else "none",
        rank_pattern=small,
        alpha_pattern=dict(small),
    )
    inject(base, config, adapter_name)
    layers = dict(lora_layers(base))
    with torch.no_grad():
        for name, (A, B) in factors.items():
            layer = layers[name]
            layer.lora_A[adapter_name].copy_(A.to(layer.lora_A[adapter_name].dtype))
            layer.lora_B[adapter_name].copy_(B.to(layer.lora_B[adapter_name].dtype))
        for name in changed_modules:
            _copy_direct_params(base.get_submodule(name), tuned_modules[name])
        for name in changed_biases:
            layers[name].base_layer.bias.copy_(tuned_modules[name].bias)
    base.requires_grad_(False)
    return base, report


def _other_changes(
    base: nn.Module, tuned_modules: dict[str, nn.Module], target_names: set[str]
) -> tuple[list[str], list[str]]:
    """(non-target modules whose own parameters changed, target layers whose bias changed)."""
    modules, biases = [], []
    for name, module in base.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not name or not own:
            continue
        other = dict(tuned_modules[name].named_parameters(recurse=False))
        if name in target_names:
            if module.bias is not None and not torch.equal(module.bias, other["bias"]):
                biases.append(name)
            continue
        if any(not torch.equal(p, other[k]) for k, p in own.items()):
            if any(t.startswith(name + ".") for t in target_names):
                raise UsageError(
                    f"{name} has its own changed parameters and holds target layers; "
                    "LoRA cannot carry it: leave its layers out of the targets"
                )
            modules.append(name)
    return modules, biases


def _copy_direct_params(dest: nn.Module, source: nn.Module) -> None:
    theirs = dict(source.named_parameters(recurse=False))
    for key, param in dest.named_parameters(recurse=False):
        param.copy_(theirs[key])


@torch.no_grad()
def delta_error(base_plus_adapter: nn.Module, tuned: nn.Module) -> float:
    """max |W_eff - W_tuned| over the adapted layers: how far base + adapter is from tuned."""
    tuned_modules = dict(tuned.named_modules())
    worst = 0.0
    for name, layer in lora_layers(base_plus_adapter):
        effective = layer.original_weight().double()
        for adapter in layer.active_adapters:
            effective = effective + layer.delta_weight(adapter).double()
        worst = max(worst, float((effective - tuned_modules[name].weight.double()).abs().max()))
    return worst
