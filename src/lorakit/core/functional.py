"""Pure tensor maths of LoRA, shared by the layers, the file code and (later) the server.

Conventions: A is (r, d_in), B is (d_out, r); the update to a weight W (d_out, d_in) is
dW = scale * B @ A. Nothing here holds state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B @ A, the dense (d_out, d_in) update."""
    return (B @ A) * scale


def add_lora_linear(
    result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float
) -> torch.Tensor:
    """result + scale * (x @ A.T) @ B.T, with the scale and the add fused into one addmm.

    Fusing saves two passes over the (tokens, d_out) activations against the textbook
    `result + lora_B(lora_A(x)) * scale`, which is most of LoRA's cost on a CPU.
    """
    return add_lora_output(result, F.linear(x.to(A.dtype), A), B, scale)


def add_lora_output(result: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """result + scale * h @ B.T for the rank-r activations h, as one fused addmm."""
    out_features = result.shape[-1]
    if h.dtype != result.dtype:  # adapter kept in fp32 over a half-precision base
        return result + (F.linear(h, B) * scale).to(result.dtype)
    fused = torch.addmm(result.reshape(-1, out_features), h.reshape(-1, h.shape[-1]), B.t(), alpha=scale)
    return fused.view(result.shape)


def worth_merging_on_the_fly(tokens: int, d_in: int, d_out: int) -> bool:
    """True when forming W + dW costs fewer flops than the factored path for this many tokens.

    The factored path costs about tokens * r * (d_in + d_out) multiply-adds plus a pass over
    the activations; forming dW costs d_in * d_out * r (r cancels). Used only when no
    gradient is needed.
    """
    return tokens * (d_in + d_out) > d_in * d_out


def expand_fused_B(B: torch.Tensor, enable_lora: list[bool], out_features: int) -> torch.Tensor:
    """loralib's MergedLinear B (out_per_slice * n_enabled, r) as a dense (out_features,
    n_enabled * r) block matrix: enabled slice j uses its own r columns, disabled slices are
    zero rows. A fused layer is then an ordinary LoRA of rank n_enabled * r."""
    n_enabled, r = sum(enable_lora), B.shape[1]
    out_per_slice = out_features // len(enable_lora)
    slices, k = [], 0
    for enabled in enable_lora:  # no index tensor: nothing crosses from host to device
        if enabled:
            rows = B[k * out_per_slice : (k + 1) * out_per_slice]
            slices.append(F.pad(rows, (k * r, (n_enabled - k - 1) * r)))
            k += 1
        else:
            slices.append(B.new_zeros(out_per_slice, n_enabled * r))
    return torch.cat(slices)


def conv_delta_peft(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """PEFT's conv LoRA: A is a conv kernel (r, c_in, *k), B a 1x1 conv (c_out, r, 1...);
    the dense kernel update is sum_r B[o, r] * A[r, i, ...]."""
    return torch.einsum("or,ri...->oi...", B.flatten(1), A) * scale


def conv_delta_loralib(A: torch.Tensor, B: torch.Tensor, scale: float, weight_shape: torch.Size) -> torch.Tensor:
    """loralib's conv LoRA: (B @ A) reshaped to the kernel's shape."""
    return (B @ A).view(weight_shape) * scale


class FusedLoraMatmul(torch.autograd.Function):
    """y = x @ (W + scale * B @ A).T + bias, with gradients for x, A, B and bias only.

    (An autograd function, not a layer: not to be confused with compat.loralib.MergedLinear.)

    For a frozen W this is LoRA with the fewest passes over the (tokens, d) activations:
    the forward is one matmul with the merged weight plus x @ A.T (kept for B's gradient);
    the backward gets x's gradient from one matmul with the merged weight instead of the
    base matmul plus a LoRA branch and an accumulation. A and B's gradients come from the
    low-rank products, never from a dense (d_out, d_in) weight gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale: float):  # weight: (d_out, d_in), frozen
        merged = torch.addmm(weight, B, A, alpha=scale)
        out = F.linear(x, merged, bias)
        x2d = x.reshape(-1, x.shape[-1])
        h = x2d @ A.t() if ctx.needs_input_grad[4] else None
        # Keep W itself (no memory) rather than the merged copy: re-forming it costs one
        # (d_out, r) x (r, d_in) product in the backward.
        ctx.save_for_backward(x2d, h, weight, A, B)
        ctx.scale, ctx.x_shape = scale, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2d, h, weight, A, B = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ torch.addmm(weight, B, A, alpha=ctx.scale)).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        # The skinny products are written in the orientation BLAS runs fastest (measured on
        # this CPU: g.T @ h takes 6x as long as (h.T @ g).T for 2048 x 384 x 8).
        if ctx.needs_input_grad[3]:
            gB = F.linear(g, B.t().contiguous())  # g @ B
            grad_A = torch.mm(gB.t(), x2d).mul_(ctx.scale)
        if ctx.needs_input_grad[4]:
            grad_B = torch.mm(h.t(), g).t().mul_(ctx.scale)
        return grad_x, None, grad_bias, grad_A, grad_B, None




def add_lora_rows(result: torch.Tensor, x: torch.Tensor, A_rows: torch.Tensor, Bt_rows: torch.Tensor) -> torch.Tensor:
    """result + per-row LoRA: row i adds (x[i] @ A_rows[i].T) @ Bt_rows[i] (scale folded into Bt_rows).

    A_rows is (batch, r, d_in), Bt_rows (batch, r, d_out); x is (batch, ..., d_in) and result
    (batch, ..., d_out). Two batched matmuls serve every row, whatever adapter each row uses.
    """
    batch = A_rows.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1]).to(A_rows.dtype)
    h = torch.bmm(x3, A_rows.transpose(1, 2))  # (batch, tokens, r)
    out3 = result.reshape(batch, -1, result.shape[-1])
    if out3.dtype != A_rows.dtype:  # adapters kept in another precision than the base
        return (out3 + torch.bmm(h, Bt_rows).to(out3.dtype)).view(result.shape)
    return torch.baddbmm(out3, h, Bt_rows).view(result.shape)


def add_lora_gathered(
    result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """add_lora_rows with row i's adapter taken from slot ids[i] of the stacked A (slots, r, d_in)
    and Bt (slots, r, d_out): one gather per matrix, so the cost does not depend on how many
    distinct adapters the batch uses."""
    return add_lora_rows(result, x, A.index_select(0, ids), Bt.index_select(0, ids))
