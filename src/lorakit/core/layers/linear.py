"""LoRA on linear maps: nn.Linear, Hugging Face Conv1D (GPT-2's transposed weight), and fused
projections where only some output slices are adapted (loralib's MergedLinear)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from lorakit.core import functional as LF
from lorakit.core.layers.base import LoraLayer
from lorakit.core.layers.forward_path import ForwardPath, choose_forward_path
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
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA magnitudes by adapter (variants/dora.py)
        # PiSSA adapters' starting factors by adapter, for pissa_convert (variants/pissa_init.py).
        self.pissa_initial: dict[str, pissa.PissaFactors] = {}

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
        return self.variants[name].delta_weight(self, name)

    # --- plain LoRA maths, which LORA (variants/base.py) calls and other variants build on ---
    def plain_delta_weight(self, name: str) -> torch.Tensor:
        """s B A in the base weight's layout (Conv1D's is transposed)."""
        delta = LF.delta_weight(self.lora_A[name], self.full_B(name), self.scaling[name])
        return delta.t() if self.fan_in_fan_out else delta

    def add_plain_delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """weight + s B A as one addmm in the base layout."""
        A, B = self.lora_A[name].to(weight.dtype), self.full_B(name).to(weight.dtype)
        if self.fan_in_fan_out:
            return torch.addmm(weight, A.t(), B.t(), alpha=self.scaling[name])
        return torch.addmm(weight, B, A, alpha=self.scaling[name])

    def add_plain_output(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        return LF.add_lora_linear(result, x, self.lora_A[name], self.full_B(name), self.scaling[name])

    # --- forward ------------------------------------------------------------------------------
    def forward_with_adapters(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        return self.forward_along(choose_forward_path(self, x, names), x, names)

    def forward_along(self, path: ForwardPath, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The output along `path` (see choose_forward_path, which picks it); every path gives
        the same values up to rounding, so tests can run each one against the dense maths."""
        if path is ForwardPath.MERGED_WEIGHT:
            return self._base_forward(x, self._cached_merged_weight(names))
        if path is ForwardPath.FUSED_TRAIN:
            return self.variants[names[0]].fused_train_forward(self, x, names[0])
        if path is ForwardPath.BASE:
            return self.base_layer(x)
        result = self.base_layer(x)
        for name in names:
            p = self.dropout_p[name]
            x_in = F.dropout(x, p, training=True) if p and self.training else x
            result = self.variants[name].add_output(self, result, x_in, name)
        return result

    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The base weight plus the adapters `names`, in the base layout (one addmm each for plain LoRA)."""
        weight = self.base_layer.weight
        for name in names:
            weight = self.variants[name].add_to_weight(self, weight, name)
        return weight

    def _cached_merged_weight(self, names: list[str]) -> torch.Tensor:
        """merged_weight(names), formed again only when a tensor involved has changed.

        The key holds each tensor's storage address and version counter (bumped by every
        in-place update, e.g. an optimizer step), so a stale weight is never used. Re-forming
        it per call costs little on a CPU, but on a GPU the extra launch per layer dominates
        small batches. The price is one merged copy of each adapted weight.
        """
        tensors = [self.base_layer.weight] + [t for n in names for t in (self.lora_A[n], self.lora_B[n])]
        for n in names:  # a variant's extras (DoRA's magnitude); plain LoRA skips the call
            if self.variants[n].extra_parameters:
                tensors += self.variants[n].parameters_of(self, n)
        key = (tuple(names), tuple(self.scaling[n] for n in names), tuple((t.data_ptr(), t._version) for t in tensors))
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self.merged_weight(names))
        return self._weight_cache[1]

    def refresh_caches(self) -> None:
        super().refresh_caches()
        self._weight_cache = None

    def train(self, mode: bool = True) -> LoraLinear:
        self._weight_cache = None  # training changes the weights: do not keep a copy around
        return super().train(mode)

    def _base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's maths with another weight of the same layout."""
        bias = self.base_layer.bias
        if self.fan_in_fan_out:
            out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, weight, bias)
