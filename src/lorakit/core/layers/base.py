"""LoraLayer: one frozen base module plus any number of named adapters.

Storage: every adapter is a pair of parameters, `lora_A[name]` (r, d_in-like) and
`lora_B[name]` (d_out-like, r), with its own rank, scaling and dropout, all keyed by name.
Separate parameters are what an optimizer trains; a server that mixes adapters in one batch
stacks these same tensors into per-layer slot tensors (ranks padded, one scaling per slot)
without changing how they are stored here.

Merging swaps the base weight for a new Parameter holding W0 + dW and keeps the original
Parameter aside, so `unmerge` restores it bit for bit (no subtract-and-hope as in loralib).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from lorakit.errors import UsageError
from lorakit.variants.base import LORA, LoraVariant
from lorakit.variants.registry import variant_named


class LoraLayer(nn.Module):
    """Base class of every LoRA layer family; subclasses define shapes, init and maths."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.dropout_p: dict[str, float] = {}
        self.variants: dict[str, LoraVariant] = {}  # how each adapter computes (variants/base.py)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.merge_on_eval = False  # loralib's merge_weights: merge on eval(), unmerge on train()
        self._original_weight: nn.Parameter | None = None
        self._pending: list[str] = []  # active adapters not merged: the ones forward must add
        base_layer.requires_grad_(False)

    # --- subclass interface ----------------------------------------------------------------
    @staticmethod
    def adapter_shapes(base: nn.Module, r: int, **options) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (A, B) for rank r on this base module."""
        raise NotImplementedError

    def reset_adapter(self, name: str, init: str) -> None:
        """Initialise A and B so that the fresh adapter adds exactly zero."""
        A, B = self.lora_A[name], self.lora_B[name]
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.rank[name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense update of adapter `name`, in the layout of the base weight."""
        raise NotImplementedError

    def forward_with_adapters(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        """Base output plus the outputs of the unmerged adapters `names`."""
        raise NotImplementedError

    def adapter_options(self) -> dict:
        """Constructor options needed to recompute adapter_shapes (e.g. enable_lora)."""
        return {}

    # --- adapters ----------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        scale: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_dora: bool = False,
        variant: str | LoraVariant | None = None,
    ) -> None:
        """Add (or replace) adapter `name` with rank r and the given scaling; it becomes active.
        `variant` (a LoraVariant or its registered name) says how it computes; `use_dora=True`
        is short for variant="dora" (variants/dora.py; linear layers only)."""
        variant = variant_named("dora" if use_dora else "lora") if variant is None else variant
        variant = variant_named(variant) if isinstance(variant, str) else variant
        variant.check_supported(self)  # before anything changes
        if name in self.lora_A:
            self.delete_adapter(name)
        weight = self.weight
        # Adapters over a half-precision base train in fp32, as PEFT does.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        shape_A, shape_B = self.adapter_shapes(self.base_layer, r, **self.adapter_options())
        self.lora_A[name] = nn.Parameter(torch.empty(shape_A, dtype=dtype, device=weight.device))
        self.lora_B[name] = nn.Parameter(torch.empty(shape_B, dtype=dtype, device=weight.device))
        self.rank[name], self.scaling[name], self.dropout_p[name] = r, scale, float(dropout)
        self.reset_adapter(name, init)
        self.variants[name] = variant
        variant.init_parameters(self, name)
        if name not in self.active_adapters:
            self.active_adapters.append(name)
        self.refresh_caches()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (unmerging it first if it is merged)."""
        if name not in self.lora_A:
            raise KeyError(f"adapter {name!r} not found; this layer has {list(self.lora_A)}")
        if name in self.merged_adapters:
            self.unmerge()
        self.variants.pop(name, LORA).delete_parameters(self, name)
        del self.lora_A[name], self.lora_B[name]
        del self.rank[name], self.scaling[name], self.dropout_p[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self.refresh_caches()

    def set_adapter(self, names: str | list[str]) -> None:
        """Make `names` the active adapters (their outputs are summed)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise KeyError(f"adapter(s) {unknown} not found; this layer has {list(self.lora_A)}")
        if self.merged_adapters and set(self.merged_adapters) - set(names):
            self.unmerge()
        self.active_adapters = names
        self.refresh_caches()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Every trainable parameter of adapter `name`: A, B and its variant's extras."""
        return [self.lora_A[name], self.lora_B[name], *self.variants[name].parameters_of(self, name)]

    # --- merge / unmerge / disable ----------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """True when the base weight is stored quantized (bitsandbytes 4-bit, lorakit.variants.qlora): no merge."""
        return hasattr(self.base_layer.weight, "quant_state")

    def check_mergeable(self) -> None:
        """Raise UsageError when the base weight cannot take a merge (a quantized base)."""
        if self.quantized:
            raise UsageError(
                f"cannot merge into a quantized (4-bit) base weight of {type(self.base_layer).__name__}: re-quantising "
                "W0 + dW would lose most of the adapter; merge into a dequantised copy instead: "
                "lorakit.variants.qlora.dequantize_model(model), then merge"
            )

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def original_weight(self) -> torch.Tensor:
        """The base weight without any merged adapter."""
        return self._original_weight if self._original_weight is not None else self.base_layer.weight

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Fold the active (or given) adapters into the base weight. Safe to call twice."""
        todo = [n for n in (names or self.active_adapters) if n not in self.merged_adapters]
        if not todo:
            return
        self.check_mergeable()
        current = self.base_layer.weight
        merged = current.detach().clone()
        for name in todo:
            merged += self.delta_weight(name).to(merged.dtype)
        if self._original_weight is None:
            # A plain attribute, not a registered Parameter: a merged layer must keep the same
            # parameters and state-dict keys as an unmerged one (counts, strict loading, loralib).
            object.__setattr__(self, "_original_weight", current)
        self.base_layer.weight = nn.Parameter(merged, requires_grad=False)
        self.merged_adapters += todo
        self.refresh_caches()

    def _apply(self, fn, recurse: bool = True):
        # The stashed unmerged weight is not registered, so .to() / .half() would miss it:
        # convert it in place, as nn.Module does parameters, so unmerge restores it converted.
        super()._apply(fn, recurse)
        if self._original_weight is not None:
            with torch.no_grad():
                self._original_weight.data = fn(self._original_weight)
        return self

    def unmerge(self) -> None:
        """Put back the exact original base weight. Safe to call when nothing is merged."""
        if self._original_weight is None:
            return
        self.base_layer.weight = self._original_weight
        self._original_weight = None
        self.merged_adapters = []
        self.refresh_caches()

    def set_disabled(self, disabled: bool) -> None:
        """Disabled, the layer gives exactly the base output (merged adapters are unmerged)."""
        if disabled:
            self.unmerge()
        self.disabled = disabled
        self.refresh_caches()

    @contextmanager
    def disable(self) -> Iterator[None]:
        previous = self.disabled
        self.set_disabled(True)
        try:
            yield
        finally:
            self.set_disabled(previous)

    def refresh_caches(self) -> None:
        """Recompute what forward reads instead of re-deriving it per call (the pending adapter
        list; subclasses add their caches). Call it after changing adapters, the merge state or
        the base weight from outside the layer's own methods (e.g. swapping base_layer)."""
        self._pending = [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]

    def train(self, mode: bool = True) -> LoraLayer:
        super().train(mode)
        if self.merge_on_eval and not self.disabled:
            self.unmerge() if mode else self.merge()
        return self

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._pending:
            return self.base_layer(x, *args, **kwargs)
        return self.forward_with_adapters(x, self._pending, *args, **kwargs)

    # Code written for the wrapped module reads .weight / .bias directly (loralib, HF tying).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.rank[n]}, scale={self.scaling[n]:g}" for n in self.lora_A]
        state = " merged" if self.merged else (" disabled" if self.disabled else "")
        return "adapters={" + "; ".join(parts) + "}, active=" + str(self.active_adapters) + state
