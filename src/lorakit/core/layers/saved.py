"""SavedModule: a module trained in full per adapter (`modules_to_save`), as PEFT's
ModulesToSaveWrapper: the original module stays untouched and frozen, every adapter gets its
own copy, and the forward uses the active adapter's copy (the original when none is active
or adapters are disabled). So a saved head never writes into a weight it shares (GPT-2's
lm_head is tied to wte), two adapters can carry different heads, and disabling or unloading
gives back the exact base module.
"""

from __future__ import annotations

import copy

import torch.nn as nn


class SavedModule(nn.Module):
    """`original_module` plus one trainable copy per adapter in `modules_to_save` (PEFT's names)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.train(original.training)

    def add_adapter(self, name: str) -> nn.Module:
        """A fresh copy of the original for adapter `name` (replacing any it had); returned."""
        module = copy.deepcopy(self.original_module)
        module.train(self.original_module.training)
        self.modules_to_save[name] = module
        return module

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, names: list[str]) -> None:
        """The first of `names` this module has a copy for becomes active (PEFT uses one)."""
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)

    def current(self) -> nn.Module:
        """The module the forward uses now."""
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        # Code written for the wrapped module reads its attributes (weight, in_features, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Half-built (copy, unpickling) or a dunder: no fallback, so no recursion.
            if name.startswith("__") or name in ("original_module", "modules_to_save", "disabled", "active_adapter"):
                raise
            return getattr(self.current(), name)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        # A module's own parameters (recurse=False) are those of the module in use, as its
        # attributes are: code that copies a module's direct parameters reaches the copy.
        if recurse:
            return super().named_parameters(prefix, recurse, remove_duplicate)
        return self.current().named_parameters(prefix, False, remove_duplicate)

    def extra_repr(self) -> str:
        return f"adapters={list(self.modules_to_save)}, active={self.active_adapter}" + (
            " disabled" if self.disabled else ""
        )


def plain_module(module: nn.Module) -> nn.Module:
    """The original module of a SavedModule, else the module itself."""
    return module.original_module if isinstance(module, SavedModule) else module


def adapter_copy(module: nn.Module, name: str) -> nn.Module:
    """Adapter `name`'s copy of a SavedModule (the module in use if it has none), else the module."""
    if not isinstance(module, SavedModule):
        return module
    return module.modules_to_save[name] if name in module.modules_to_save else module.current()
