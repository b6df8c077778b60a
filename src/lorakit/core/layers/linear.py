"""LoRA on linear maps: nn.Linear, Hugging Face Conv1D (GPT-2's transposed weight), and fused
projections where only some output slices are adapted (loralib's MergedLinear)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from lorakit.core import functional as LF
from lorakit.core.layers.base import LoraLayer
from lorakit.variants import dora
from lorakit.variants import pissa_init as pissa


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


class LoraLinear(LoraLayer):
    """LoRA over nn.Linear or Conv1D. With `enable_lora`, a fused projection (e.g. GPT-2's
    c_attn = [q | k | v]) where only the enabled slices get a rank-r update each."""

    def __init__(self, base_layer: nn.Module, enable_lora: list[bool] | None = None) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # weight stored as (in, out)
        self.in_features, self.out_features = linear_dims(base_layer)
        if enable_lora is not None and self.out_features % len(enable_lora):
            raise ValueError(
                f"enable_lora={enable_lora}: {len(enable_lora)} slices do not divide "
                f"out_features={self.out_features}; use one flag per equal-sized slice"
            )
        self.enable_lora = enable_lora
        self._weight_cache: tuple | None = None  # (key, merged weight) for unmerged inference
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA magnitudes by adapter (layers/dora.py)
        self._dora_names: frozenset[str] = frozenset()  # its keys, kept by _refresh for a cheap forward test

    @staticmethod
    def adapter_shapes(base: nn.Module, r: int, enable_lora: list[bool] | None = None):
        d_in, d_out = linear_dims(base)
        if enable_lora is None:
            return (r, d_in), (d_out, r)
        n = sum(enable_lora)
        return (r * n, d_in), (d_out // len(enable_lora) * n, r)

    def adapter_options(self) -> dict:
        return {"enable_lora": self.enable_lora}

    def full_B(self, name: str) -> torch.Tensor:
        """B as a dense (out_features, rank) matrix; block-structured for fused layers."""
        B = self.lora_B[name]
        if self.enable_lora is None:
            return B
        return LF.expand_fused_B(B, self.enable_lora, self.out_features)

    def reset_adapter(self, name: str, init: str) -> None:
        if init.startswith("pissa"):
            try:
                pissa.init_pissa(self, name, init)
            except pissa.PissaError:
                self.delete_adapter(name)  # leave the layer as it was before add_adapter
                raise
        else:
            super().reset_adapter(name, init)

    def delta_weight(self, name: str) -> torch.Tensor:
        if dora.is_dora(self, name):
            return dora.delta_weight(self, name)
        delta = LF.delta_weight(self.lora_A[name], self.full_B(name), self.scaling[name])
        return delta.t() if self.fan_in_fan_out else delta

    def forward_with_adapters(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        use_dora = bool(self._dora_names) and not self._dora_names.isdisjoint(names)
        dropout_on = self.training and any(self.dropout_p[n] for n in names)
        # A quantized base has no dense weight to add dW to: the factored path only.
        if not dropout_on and self._fly_merge_pays(x) and not self.quantized:
            if not torch.is_grad_enabled():  # inference: one matmul with W + dW
                return self._base_forward(x, self._cached_merged_weight(names))
            if len(names) == 1 and not self.base_layer.weight.requires_grad:
                fused = self._fused_train_forward(x, names[0], use_dora)
                if fused is not None:
                    return fused
        if use_dora:
            return dora.reference_forward(self, x, names)  # PEFT's maths with autograd
        result = self.base_layer(x)
        for name in names:
            p = self.dropout_p[name]
            x_in = F.dropout(x, p, training=True) if p and self.training else x
            result = LF.add_lora_linear(result, x_in, self.lora_A[name], self.full_B(name), self.scaling[name])
        return result

    def _fused_train_forward(self, x: torch.Tensor, name: str, use_dora: bool) -> torch.Tensor | None:
        """Training without LoRA dropout over a frozen base: the fused merged-weight autograd
        function (DoRA's or plain LoRA's), or None where it does not apply."""
        A, weight = self.lora_A[name], self.base_layer.weight
        # An fp32 adapter over a half base, or autocast (whose dtype choices the functions'
        # hand-written backwards would not repeat): keep the textbook path.
        if A.dtype != weight.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        weight = weight.t() if self.fan_in_fan_out else weight
        bias, scale = self.base_layer.bias, self.scaling[name]
        if use_dora:
            magnitude = self.lora_magnitude_vector[name]
            return dora.DoraLinearFunction.apply(x, weight, bias, A, self.full_B(name), magnitude, scale)
        if self.enable_lora is not None:
            return None
        return LF.MergedLoraLinear.apply(x, weight, bias, A, self.lora_B[name], scale)

    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The base weight plus the adapters `names`, in the base layout (one addmm each)."""
        weight = self.base_layer.weight
        for name in names:
            A, B = self.lora_A[name].to(weight.dtype), self.full_B(name).to(weight.dtype)
            if dora.is_dora(self, name):
                weight = weight + self.delta_weight(name).to(weight.dtype)
            elif self.fan_in_fan_out:
                weight = torch.addmm(weight, A.t(), B.t(), alpha=self.scaling[name])
            else:
                weight = torch.addmm(weight, B, A, alpha=self.scaling[name])
        return weight

    def _cached_merged_weight(self, names: list[str]) -> torch.Tensor:
        """merged_weight(names), formed again only when a tensor involved has changed.

        The key holds each tensor's storage address and version counter (bumped by every
        in-place update, e.g. an optimizer step), so a stale weight is never used. Re-forming
        it per call costs little on a CPU, but on a GPU the extra launch per layer dominates
        small batches. The price is one merged copy of each adapted weight.
        """
        tensors = [self.base_layer.weight] + [t for n in names for t in (self.lora_A[n], self.lora_B[n])]
        tensors += [self.lora_magnitude_vector[n] for n in names if n in self.lora_magnitude_vector]  # DoRA
        key = (tuple(names), tuple(self.scaling[n] for n in names), tuple((t.data_ptr(), t._version) for t in tensors))
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self.merged_weight(names))
        return self._weight_cache[1]

    def delete_adapter(self, name: str) -> None:
        if name in self.lora_magnitude_vector:  # DoRA; dropped before the base's _refresh
            del self.lora_magnitude_vector[name]
        super().delete_adapter(name)

    def _refresh(self) -> None:
        super()._refresh()
        self._weight_cache = None
        self._dora_names = frozenset(self.lora_magnitude_vector)

    def train(self, mode: bool = True) -> LoraLinear:
        self._weight_cache = None  # training changes the weights: do not keep a copy around
        return super().train(mode)

    def _fly_merge_pays(self, x: torch.Tensor) -> bool:
        tokens = x.numel() // x.shape[-1]
        return LF.worth_merging_on_the_fly(tokens, self.in_features, self.out_features)

    def _base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's maths with another weight of the same layout."""
        bias = self.base_layer.bias
        if self.fan_in_fan_out:
            out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, weight, bias)
