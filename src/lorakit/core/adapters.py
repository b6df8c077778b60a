"""Model-level adapter management: switch, delete, merge, unmerge, disable, unload."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

from lorakit.core.inject import lora_layers, reapply_values, saved_modules, swap_base_values
from lorakit.core.registry import adapter_configs, forget_adapter_configs, forget_base_values


def _layers_or_fail(model: nn.Module):
    layers = lora_layers(model)
    if not layers and not saved_modules(model):
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call lorakit.inject or load_adapter first")
    return layers


def set_adapter(model: nn.Module, name: str | list[str]) -> None:
    """Make `name` (or several names, summed) the active adapter(s) of every layer holding them."""
    names = [name] if isinstance(name, str) else list(name)
    known = adapter_configs(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"adapter(s) {unknown} not loaded; loaded: {sorted(known)}")
    for _, layer in _layers_or_fail(model):
        layer.set_adapter([n for n in names if n in layer.lora_A])
    for _, saved in saved_modules(model):
        saved.set_adapter(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; layers left with no adapter go back to their base."""
    configs = adapter_configs(model)
    if name not in configs:
        raise KeyError(f"adapter {name!r} not loaded; loaded: {sorted(configs)}")
    for layer_name, layer in _layers_or_fail(model):
        if name in layer.lora_A:
            layer.delete_adapter(name)
        if not layer.lora_A:
            layer.unmerge()
            model.set_submodule(layer_name, layer.base_layer)
    for saved_name, saved in saved_modules(model):
        if name in saved.modules_to_save:
            saved.delete_adapter(name)
        if not saved.modules_to_save:
            model.set_submodule(saved_name, saved.original_module)
    del configs[name]
    if not configs:  # the last adapter gone: base biases / tables it changed come back
        swap_base_values(model)


def merge(model: nn.Module) -> None:
    """Fold the active adapters into the base weights (zero added latency). Safe to call twice."""
    layers = _layers_or_fail(model)
    for _, layer in layers:  # refuse before any layer changes: a half-merged model helps nobody
        layer.check_mergeable()
    for _, layer in layers:
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Restore the exact original base weights; adapters work unmerged again."""
    for _, layer in _layers_or_fail(model):
        layer.unmerge()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model gives exactly the base model's output."""
    layers = _layers_or_fail(model)
    previous = [(layer, layer.disabled, list(layer.merged_adapters)) for _, layer in layers]
    saved = [(module, module.disabled) for _, module in saved_modules(model)]
    for _, layer in layers:
        layer.set_disabled(True)
    for module, _ in saved:
        module.disabled = True
    adapted = swap_base_values(model, restore=False)  # base biases / tables, as before any adapter
    try:
        yield
    finally:
        reapply_values(model, adapted)
        for module, was_disabled in saved:
            module.disabled = was_disabled
        for layer, was_disabled, merged in previous:
            layer.set_disabled(was_disabled)
            if merged:
                layer.merge(merged)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and put the plain base modules back: the result has no
    lorakit module left and `save_pretrained` writes an ordinary checkpoint."""
    layers = _layers_or_fail(model)
    for _, layer in layers:
        if not layer.disabled:
            layer.check_mergeable()
    for name, layer in layers:
        if not layer.disabled:
            layer.merge()
        layer._original_weight = None  # drop the unmerged copy: nothing can unmerge now
        model.set_submodule(name, layer.base_layer)
    for name, saved in saved_modules(model):  # the active adapter's copy takes the original's place
        model.set_submodule(name, saved.current())
    forget_adapter_configs(model)
    forget_base_values(model)  # the adapter's biases / tables are the new base
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the untouched base model."""
    layers = _layers_or_fail(model)
    swap_base_values(model)
    for name, layer in layers:
        layer.unmerge()
        model.set_submodule(name, layer.base_layer)
    for name, saved in saved_modules(model):
        model.set_submodule(name, saved.original_module)
    forget_adapter_configs(model)
    return model
