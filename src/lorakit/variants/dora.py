"""DoRA (weight-decomposed LoRA, Liu et al. 2024): its maths and `DORA`, the LoraVariant
(variants/base.py) a linear LoRA layer holds for each DoRA adapter.

For W' = W0 + s B A (in the (out, in) layout) the layer computes

    y = m / ||W'||_row * (W' x) + bias

with the magnitude m (one value per output, initialised to ||W0 + s B A||_row, so a fresh
adapter is the base) learned, and the norm treated as a constant in the backward, as the
paper's section 4.3 and PEFT do. PEFT calls the per-output norm "column-wise": same thing.

Several active adapters add up as in PEFT: each DoRA adapter contributes
(m/n - 1) * W0 x + m/n * s B A x on top of the base output, so merging adds exactly that
dense update (`delta_weight`) and merged == unmerged.

Speed: PEFT forms B @ A through an identity-matrix forward, keeps the base output, and makes
four passes over the (tokens, out) activations. With no dropout this module forms W' once
(the same d_out * d_in * r multiply-adds the norm needs anyway), runs one matmul with it and
scales by m / n in one fused pass; the backward gets x's gradient from one matmul with the
scaled W' and A, B, m's from rank-r products (never a dense weight gradient).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.errors import LorakitError
from lorakit.variants.base import LoraVariant


class DoraError(LorakitError):
    """DoRA was asked for where lorakit does not support it."""


def _w0(layer) -> torch.Tensor:
    """The unmerged base weight in the (out, in) layout."""
    weight = layer.original_weight()
    return weight.t() if layer.fan_in_fan_out else weight


def adapted_weight(layer, name: str, w0: torch.Tensor | None = None) -> torch.Tensor:
    """W0 + s B A in the (out, in) layout, in the adapter's dtype."""
    A = layer.lora_A[name]
    w0 = (_w0(layer) if w0 is None else w0).to(A.dtype)
    return torch.addmm(w0, layer.full_B(name), A, alpha=layer.scaling[name])


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output row, detached (DoRA section 4.3)."""
    return torch.linalg.vector_norm(weight.detach(), dim=1)


def check_supported(layer) -> None:
    """Raise DoraError unless `layer` (a LoRA layer) can hold DoRA adapters."""
    if not hasattr(layer, "lora_magnitude_vector"):
        raise DoraError(
            f"use_dora: lorakit has DoRA for linear layers only, not {type(layer).__name__}; "
            "target only linear modules (e.g. target_modules='all-linear')"
        )
    if getattr(layer, "quantized", False):
        raise DoraError("use_dora: DoRA over a quantized (4-bit) base is not supported; use plain LoRA (QLoRA)")


def init_magnitude(layer, name: str) -> None:
    """Give adapter `name` of a linear LoRA layer a DoRA magnitude = ||W0 + s B A||_row."""
    check_supported(layer)
    with torch.no_grad():
        magnitude = row_norm(adapted_weight(layer, name))
    layer.lora_magnitude_vector[name] = nn.Parameter(magnitude, requires_grad=layer.lora_A[name].requires_grad)


def is_dora(layer, name: str) -> bool:
    """True when adapter `name` of `layer` is a DoRA adapter."""
    magnitudes = getattr(layer, "lora_magnitude_vector", None)
    return magnitudes is not None and name in magnitudes


def delta_weight(layer, name: str) -> torch.Tensor:
    """The dense update merging adds, in the layout of the base weight: m/n * W' - W0."""
    w0 = _w0(layer)
    adapted = adapted_weight(layer, name, w0)
    factor = (layer.lora_magnitude_vector[name] / row_norm(adapted)).unsqueeze(1)
    delta = factor * adapted - w0.to(adapted.dtype)
    return delta.t() if layer.fan_in_fan_out else delta


def add_output(layer, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """result + DoRA adapter `name`'s term (m/n - 1) * W0 x + m/n * s B A x for the
    (dropped-out) input x: PEFT's maths with autograd (dropout, several adapters, mixed
    dtypes, autocast), the norm a constant."""
    A, B, scale = layer.lora_A[name], layer.full_B(name), layer.scaling[name]
    w0 = _w0(layer)
    with torch.no_grad():
        norm = row_norm(adapted_weight(layer, name, w0))
    g = layer.lora_magnitude_vector[name] / norm
    base = F.linear(x.to(A.dtype), w0.to(A.dtype))
    lora = F.linear(F.linear(x.to(A.dtype), A), B) * scale
    return result + ((g - 1) * base + g * lora).to(result.dtype)


class DoraVariant(LoraVariant):
    """DoRA as a LoraVariant: one learned magnitude per output, saved as PEFT's
    `<module>.lora_magnitude_vector`; not a low-rank add, so no batched form."""

    name, label, config_flag = "dora", "DoRA", "use_dora"
    extra_parameters = {"lora_magnitude_vector": ".lora_magnitude_vector"}

    def extra_shapes(self, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
        return {"lora_magnitude_vector": (d_out,)}  # one magnitude per output

    def check_supported(self, layer) -> None:
        check_supported(layer)

    def init_parameters(self, layer, name: str) -> None:
        init_magnitude(layer, name)

    def delta_weight(self, layer, name: str) -> torch.Tensor:
        return delta_weight(layer, name)

    def add_to_weight(self, layer, weight: torch.Tensor, name: str) -> torch.Tensor:
        return weight + delta_weight(layer, name).to(weight.dtype)

    def add_output(self, layer, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        return add_output(layer, result, x, name)

    def has_fused_train(self, layer) -> bool:
        return True  # DoraLinearFunction takes the dense (block-structured) B of fused layers too

    def fused_train_forward(self, layer, x: torch.Tensor, name: str) -> torch.Tensor:
        weight = layer.base_layer.weight
        weight = weight.t() if layer.fan_in_fan_out else weight
        A, B, magnitude = layer.lora_A[name], layer.full_B(name), layer.lora_magnitude_vector[name]
        return DoraLinearFunction.apply(x, weight, layer.base_layer.bias, A, B, magnitude, layer.scaling[name])

    def batched_factors(self, layer, name: str) -> None:
        return None


DORA = DoraVariant()


class DoraLinearFunction(torch.autograd.Function):
    """y = g * (x @ W'.T) + bias, W' = W0 + s B A, g = m / ||W'||_row (a constant in the backward).

    Gradients for x, A, B, m and bias; W0 is frozen. Saves x, x @ A.T and x @ W'.T (the last
    for m's gradient); W' is formed again in the backward rather than kept.
    """

    @staticmethod
    def forward(ctx, x, w0, bias, A, B, magnitude, scale: float):
        adapted = torch.addmm(w0, B, A, alpha=scale)
        norm = torch.linalg.vector_norm(adapted, dim=1)
        g = magnitude / norm
        x2d = x.reshape(-1, x.shape[-1])
        z = x2d @ adapted.t()  # (tokens, out) before the magnitude scale
        out = torch.addcmul(bias, z, g) if bias is not None else z * g
        h = x2d @ A.t() if ctx.needs_input_grad[4] else None
        ctx.save_for_backward(x2d, h, z if ctx.needs_input_grad[5] else None, w0, A, B, norm, g)
        ctx.scale, ctx.x_shape = scale, x.shape
        return out.view(*x.shape[:-1], w0.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, h, z, w0, A, B, norm, g = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = grad_A = grad_B = grad_m = None
        if ctx.needs_input_grad[0]:
            scaled = torch.addmm(w0, B, A, alpha=ctx.scale).mul_(g.unsqueeze(1))
            grad_x = (grad @ scaled).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        if ctx.needs_input_grad[3]:
            # d/dA of s * g * (B A x): the output scale g folds into B (a (out, r) product).
            gB = F.linear(grad, (B * g.unsqueeze(1)).t().contiguous())
            grad_A = torch.mm(gB.t(), x2d).mul_(ctx.scale)
        if ctx.needs_input_grad[4]:
            grad_B = torch.mm(h.t(), grad).t().mul_(g.unsqueeze(1) * ctx.scale)
        if ctx.needs_input_grad[5]:
            grad_m = (grad * z).sum(0) / norm
        return grad_x, None, grad_bias, grad_A, grad_B, grad_m, None
