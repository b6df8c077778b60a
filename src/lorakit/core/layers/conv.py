"""LoRA on nn.Conv1d / nn.Conv2d, in the two parametrisations found in the wild.

- "peft" (what injection uses, and what PEFT / vLLM files hold): A is a conv with the base
  kernel, stride and padding mapping c_in -> r channels, B a 1x1 conv mapping r -> c_out.
- "loralib" (Microsoft's loralib.Conv2d): A (r*k, c_in*k) and B (c_out/groups*k, r*k), whose
  product reshaped to the kernel's shape is the update. Kept so loralib checkpoints load.
Both are the same layer; only the shapes and the delta formula differ.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from lorakit.core import functional as LF
from lorakit.core.layers.base import LoraLayer

ConvStyle = Literal["peft", "loralib"]


class LoraConv(LoraLayer):
    """LoRA over nn.Conv1d or nn.Conv2d."""

    def __init__(self, base_layer: nn.Module, style: ConvStyle = "peft") -> None:
        super().__init__(base_layer)
        if style not in ("peft", "loralib"):
            raise ValueError(f"style={style!r}: must be 'peft' or 'loralib'")
        if style == "peft" and base_layer.groups != 1:
            raise ValueError(
                f"grouped convolutions (groups={base_layer.groups}) cannot take PEFT-style LoRA; "
                "exclude this module from target_modules"
            )
        self.style = style

    @staticmethod
    def adapter_shapes(base: nn.Module, r: int, style: ConvStyle = "peft"):
        kernel = tuple(base.kernel_size)
        c_in, c_out = base.in_channels, base.out_channels
        if style == "peft":
            return (r, c_in, *kernel), (c_out, r, *([1] * len(kernel)))
        k = kernel[0]
        if len(kernel) == 1:  # loralib's own formula breaks for Conv1d with k > 1; this one fits
            return (r * k, c_in), (c_out // base.groups * k, r * k)
        return (r * k, c_in * k), (c_out // base.groups * k, r * k)

    def adapter_options(self) -> dict:
        return {"style": self.style}

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        if self.style == "peft":
            return LF.conv_delta_peft(A, B, scale)
        return LF.conv_delta_loralib(A, B, scale, self.base_layer.weight.shape)

    def forward_with_adapters(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        base = self.base_layer
        if self.style == "loralib":  # as loralib: one conv with W + dW
            weight = base.weight
            for name in names:
                weight = weight + self.delta_weight(name).to(weight.dtype)
            return base._conv_forward(x, weight, base.bias)
        result = base(x)
        for name in names:
            p = self.dropout_p[name]
            x_in = nn.functional.dropout(x, p, training=True) if p and self.training else x
            A, B = self.lora_A[name], self.lora_B[name]
            h = base._conv_forward(x_in.to(A.dtype), A, None)  # base stride, padding, dilation
            result = result + (_pointwise(h, B) * self.scaling[name]).to(result.dtype)
        return result


def _pointwise(h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The 1x1 convolution B applied to h (channels second)."""
    conv = nn.functional.conv2d if B.dim() == 4 else nn.functional.conv1d
    return conv(h, B)
