"""The interface of a LoRA variant: how one adapter of a linear LoRA layer turns its
parameters into an update (PEFT's `LoraVariant`, as one flat object per variant).

A variant is stateless and shared by every layer: the per-adapter tensors live on the layer
(`lora_A[name]`, `lora_B[name]`, plus the variant's `extra_parameters`, e.g. DoRA's
`lora_magnitude_vector[name]`), and the layer keeps `variants[name]`, the variant of each
adapter. The layer owns what is common to every variant (dropout, choosing the forward path,
the merged-weight cache, merge / unmerge by swapping the base weight); a variant answers:

- its parameters: `extra_parameters` (attribute of the layer -> PEFT save-key suffix),
  created by `init_parameters`;
- its maths: `add_output` (the factored forward term), `delta_weight` (the dense update merging
  adds; unmerge restores the stashed base weight, so it needs nothing from the variant),
  `add_to_weight` (W + dW for merged-weight inference), `fused_train_forward` (a hand-written
  autograd function for training, where it has one);
- `batched_factors`: the low-rank factors a mixed-adapter server batch gathers, or None where
  the variant is not a low-rank add (the server then refuses the adapter).

A third variant is one new file with a subclass, plus its entry in variants/registry.py.
"""

from __future__ import annotations

import torch

from lorakit.core.functional import FusedLoraMatmul


class LoraVariant:
    """Plain-LoRA defaults; subclasses override what their maths changes."""

    name: str = "lora"  # the registry key (variants/registry.py)
    label: str = "LoRA"  # how messages spell it
    config_flag: str | None = None  # the LoraConfig / PEFT field that asks for it, e.g. "use_dora"
    # Layer attribute (an nn.ParameterDict keyed by adapter) -> suffix of its key in a PEFT
    # adapter file, e.g. {"lora_magnitude_vector": ".lora_magnitude_vector"}.
    extra_parameters: dict[str, str] = {}

    @property
    def save_suffixes(self) -> tuple[str, ...]:
        """The PEFT key suffixes of the variant's extra tensors (beyond lora_A / lora_B)."""
        return tuple(self.extra_parameters.values())

    def extra_shapes(self, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
        """Layer attribute -> shape of each extra tensor one adapter of this variant has on a
        (d_in -> d_out) linear layer: what an adapter file must hold for it, beyond A and B."""
        return {}

    def check_supported(self, layer) -> None:
        """Raise (a LorakitError) before anything changes if `layer` cannot hold this variant."""

    def init_parameters(self, layer, name: str) -> None:
        """Create the extra parameters of adapter `name` once A and B are initialised."""

    def parameters_of(self, layer, name: str) -> list[torch.Tensor]:
        """The extra parameters of adapter `name` (they train with A and B)."""
        return [getattr(layer, attr)[name] for attr in self.extra_parameters]

    def delete_parameters(self, layer, name: str) -> None:
        for attr in self.extra_parameters:
            del getattr(layer, attr)[name]

    # --- maths ---------------------------------------------------------------------------------
    def delta_weight(self, layer, name: str) -> torch.Tensor:
        """The dense update merging adds, in the base weight's layout."""
        return layer.plain_delta_weight(name)

    def add_to_weight(self, layer, weight: torch.Tensor, name: str) -> torch.Tensor:
        """weight + delta_weight, as cheaply as the variant allows (merged-weight inference)."""
        return layer.add_plain_delta(weight, name)

    def add_output(self, layer, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """result (the output so far) plus adapter `name`'s term for the (dropped-out) input x."""
        return layer.add_plain_output(result, x, name)

    def has_fused_train(self, layer) -> bool:
        """True when `fused_train_forward` serves this layer (else training takes the factored path)."""
        return layer.enable_lora is None

    def fused_train_forward(self, layer, x: torch.Tensor, name: str) -> torch.Tensor:
        """The layer's output with the single adapter `name` over a frozen base, as one
        hand-written autograd function (no dropout, adapter dtype == base dtype, no autocast)."""
        weight = layer.base_layer.weight
        weight = weight.t() if layer.fan_in_fan_out else weight
        A, B = layer.lora_A[name], layer.lora_B[name]
        return FusedLoraMatmul.apply(x, weight, layer.base_layer.bias, A, B, layer.scaling[name])

    def batched_factors(self, layer, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, scale) with the dense B, for a server's gathered low-rank add; None when the
        variant's output is not base + scale * B A x."""
        return layer.lora_A[name], layer.full_B(name), layer.scaling[name]


LORA = LoraVariant()  # plain LoRA: base + scale * B A x
