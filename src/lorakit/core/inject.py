"""Injection: find the target modules, wrap them in LoRA layers, mark what trains."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
import torch.nn as nn

from lorakit.core.config import LoraConfig
from lorakit.core.layers import (
    SUPPORTED,
    LoraConv,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    SavedModule,
    is_linear,
    layer_class_for,
)
from lorakit.core.registry import (  # CONFIGS_ATTR, BASE_VALUES_ATTR, adapter_configs: re-exported
    BASE_VALUES_ATTR,  # noqa: F401
    CONFIGS_ATTR,  # noqa: F401
    adapter_configs,  # noqa: F401
    base_values,
    forget_base_values,
    set_adapter_config,
)
from lorakit.errors import LorakitError
from lorakit.hf import ALL_LINEAR_EXCLUDED_HEADS
from lorakit.variants.registry import variant_for

# Output heads that "all-linear" leaves alone (a LoRA on the head is almost never wanted).
HEAD_NAMES = ALL_LINEAR_EXCLUDED_HEADS  # output heads all-linear leaves alone (lorakit.hf)


class TargetError(LorakitError):
    """target_modules / modules_to_save do not fit the model; the message lists candidates."""


def walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules(), but LoRA layers and saved modules count as one module (their insides
    are skipped)."""
    lora_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in lora_prefixes):
            continue
        if isinstance(module, LoraLayer | SavedModule):
            lora_prefixes.append(name)
        yield name, module


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer of the model with its name."""
    return [(n, m) for n, m in walk(model) if isinstance(m, LoraLayer)]


def saved_modules(model: nn.Module) -> list[tuple[str, SavedModule]]:
    """Every module saved in full (modules_to_save) with its name."""
    return [(n, m) for n, m in walk(model) if isinstance(m, SavedModule)]


def _suffix_match(name: str, keys: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def _head_names(model: nn.Module) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in walk(model):
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if name.split(".")[-1] in HEAD_NAMES or (out is not None and base is out):
            heads.add(name)
    return heads


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The modules `config` adapts, in model order, without changing the model."""
    target, exclude = config.target_modules, config.exclude_modules
    keep = config.modules_to_save or []
    heads = _head_names(model) if target == "all-linear" else set()
    found, unsupported = [], []
    for name, module in walk(model):
        if not name or _suffix_match(name, keep) or any(f".{k}." in f".{name}." for k in keep):
            continue
        if exclude and (re.fullmatch(exclude, name) if isinstance(exclude, str) else _suffix_match(name, exclude)):
            continue
        if target == "all-linear":
            hit = is_linear(module) and name not in heads
        elif isinstance(target, str):
            hit = re.fullmatch(target, name) is not None and layer_class_for(module) is not None
        else:
            hit = _suffix_match(name, target)
        if not hit:
            continue
        if layer_class_for(module) is None:
            unsupported.append(f"{name} ({type(module).__name__})")
        else:
            found.append((name, module))
    if unsupported:
        raise TargetError(
            f"target_modules={target!r} matches modules LoRA cannot adapt: {', '.join(unsupported[:5])}; "
            f"supported types are {SUPPORTED}: name their linear sub-layers instead"
        )
    if not found:
        raise TargetError(
            f"target_modules={target!r} matches no module of {type(model).__name__}; "
            f"candidates: {', '.join(candidate_names(model))}"
        )
    return found


def candidate_names(model: nn.Module, limit: int = 30) -> list[str]:
    """Distinct last-name parts of the adaptable modules (what target_modules usually lists)."""
    names = dict.fromkeys(n.split(".")[-1] for n, m in walk(model) if n and layer_class_for(m) is not None)
    listed = list(names)
    return listed[:limit] + ([f"... {len(listed) - limit} more"] if len(listed) > limit else [])


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """Modules trained in full and saved with the adapter. PEFT's task types add names that
    may not exist (e.g. "score" on BERT), so only a list that matches nothing is an error."""
    keys = config.modules_to_save or []
    found = [(n, m) for n, m in walk(model) if n and _suffix_match(n, keys)]
    if keys and not found:
        raise TargetError(
            f"modules_to_save={keys!r} matches no module; top-level modules: "
            f"{', '.join(n for n, _ in model.named_children())}"
        )
    return found


def _wrap(module: nn.Module, name: str, config: LoraConfig) -> LoraLayer:
    cls = layer_class_for(module)
    if cls is LoraLinear:
        return LoraLinear(module, enable_lora=config.enable_lora_for(name))
    if cls is LoraEmbedding:
        return LoraEmbedding(module)
    return LoraConv(module)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` to the modules `config` targets (wrapping them in LoRA
    layers where needed), make it the active, trainable adapter, and return the model."""
    targets = find_targets(model, config)
    keep = find_modules_to_save(model, config)
    variant = variant_for(config)
    not_linear = [n for n, m in targets if not is_linear(m)] if variant.extra_parameters else []
    if not_linear:  # checked before any module changes (only linear layers hold a variant's extras)
        raise TargetError(
            f"{variant.config_flag}: {variant.label} adapts linear layers only, not {', '.join(not_linear[:5])}; "
            "exclude them"
        )
    for name, module in targets:
        layer = module if isinstance(module, LoraLayer) else _wrap(module, name, config)
        layer.add_adapter(
            adapter_name, config.rank_for(name), config.scaling_for(name), config.dropout, config.init, variant=variant
        )
        if layer is not module:
            layer.train(module.training)  # follow the replaced module: no dropout in an eval model
            model.set_submodule(name, layer)
    copies = []
    for name, module in keep:  # a trainable copy per adapter; the original stays as it is
        wrapper = module if isinstance(module, SavedModule) else SavedModule(module)
        copies.append(wrapper.add_adapter(adapter_name))
        if wrapper is not module:
            model.set_submodule(name, wrapper)
    set_adapter_config(model, adapter_name, config)
    for _, layer in lora_layers(model):  # the new adapter becomes the only active one
        layer.set_adapter([adapter_name] if adapter_name in layer.lora_A else [])
    for _, wrapper in saved_modules(model):
        wrapper.set_adapter([adapter_name])
    mark_trainable(model, adapter_name, config.bias, copies)
    if config.bias != "none":  # biases train in place in the base: keep their base values
        stash_base_values(model, [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")])
    return model


def mark_trainable(
    model: nn.Module, adapter_name: str, bias: str = "none", full_modules: list[nn.Module] | None = None
) -> None:
    """Only adapter `adapter_name`, the chosen biases and `full_modules` train."""
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            for param in layer.adapter_parameters(adapter_name):  # A, B and the variant's (DoRA's m)
                param.requires_grad_(True)
            if bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad_(True)
    if bias == "all":
        inside = tuple(f"{n}." for n, _ in saved_modules(model))  # saved originals never train
        for name, param in model.named_parameters():
            if name.endswith("bias") and not name.startswith(inside):
                param.requires_grad_(True)
    for module in full_modules or []:
        module.requires_grad_(True)


def stash_base_values(model: nn.Module, params: list[torch.Tensor]) -> None:
    """Remember the present values of base parameters an adapter is about to change in place
    (trained biases, PEFT's full embedding tables), once each, so unload / disable_adapters
    can put the exact base back."""
    stash = base_values(model, create=True)
    known = {id(p) for p, _ in stash}
    for param in params:
        if id(param) not in known:
            known.add(id(param))
            stash.append((param, param.detach().clone()))


@torch.no_grad()
def swap_base_values(model: nn.Module, restore: bool = True) -> list[torch.Tensor]:
    """Put the stashed base values back; returns the values they replaced (for a swap back).
    With restore=True the stash is dropped: the base owns those values again."""
    stash = base_values(model)
    replaced = []
    for param, original in stash:
        replaced.append(param.detach().clone())
        param.copy_(original)
    if restore:
        forget_base_values(model)
    return replaced


@torch.no_grad()
def reapply_values(model: nn.Module, values: list[torch.Tensor]) -> None:
    """Undo swap_base_values(restore=False) with the values it returned."""
    for (param, _), value in zip(base_values(model), values, strict=True):
        param.copy_(value)


def parameter_report(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts, and the trainable share in percent."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}
