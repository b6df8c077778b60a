"""PiSSA initialisation (Meng et al. 2024) of one linear LoRA layer.

PiSSA starts A and B on the principal singular directions of W0 instead of at zero:
W0 = U S V^T, B0 = U_r sqrt(S_r / s), A0 = sqrt(S_r / s) V_r^T (s = the adapter's scaling,
so s B0 A0 is the rank-r truncation of W0), and the frozen base keeps the residual
W0 - s B0 A0. A fresh PiSSA adapter therefore gives the base output up to rounding, and
training moves the dominant directions. The factors are PEFT's (`pissa_init` in
peft/tuners/lora/layer.py), so the same W0 and rank give the same A0, B0.

"pissa_niter_<N>" uses torch.svd_lowrank (randomized, N subspace iterations): much faster
on large weights, near the exact factors when the spectrum decays.

This module only INITIALISES. The initial factors are kept on the layer
(`layer.pissa_initial[name]`, a PissaFactors), so that lorakit.variants.pissa_convert can later
CONVERT the trained adapter into a plain LoRA for the ORIGINAL base (save_pissa_as_lora).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lorakit.errors import LorakitError


class PissaFactors(NamedTuple):
    """The factors a PiSSA adapter started from: the frozen base holds W0 - s B0 A0, which
    pissa_convert needs to express the trained adapter against W0 again. Kept in memory only
    (not in the state dict); a later process reads them from the adapter saved right after
    initialisation instead."""

    A0: torch.Tensor  # (r, in)
    B0: torch.Tensor  # (out, r)


class PissaError(LorakitError):
    """PiSSA cannot initialise this layer (the message says why and what to do)."""


def pissa_factors(weight: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) for an (out, in) fp32 weight: s * B0 @ A0 is W0's best rank-r approximation
    (exact SVD for init="pissa", randomized for "pissa_niter_<N>")."""
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        niter = int(init.removeprefix("pissa_niter_"))
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh = V.t()
    root = torch.sqrt(S / scale)
    return root.unsqueeze(1) * Vh, U * root.unsqueeze(0)


def init_pissa(layer, name: str, init: str) -> None:
    """Initialise adapter `name` of a LoraLinear with PiSSA and make its base the residual."""
    weight = layer.base_layer.weight
    r = layer.rank[name]
    problem = None
    if layer.enable_lora is not None:
        problem = "fused projections (enable_lora) are not supported; use a plain target"
    elif layer.merged:
        problem = "the layer has merged adapters; unmerge first"
    elif len(layer.lora_A) > 1:
        others = [n for n in layer.lora_A if n != name]
        problem = f"the layer already holds adapters {others}, whose base it would change"
    elif weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        problem = f"the base weight is {weight.dtype}; initialise PiSSA on a float base, then quantize the residual"
    elif r > min(layer.in_features, layer.out_features):
        problem = f"rank {r} exceeds min(in, out) = {min(layer.in_features, layer.out_features)}"
    if problem:
        raise PissaError(f"init={init!r} on adapter {name!r}: {problem}")
    scale = layer.scaling[name]
    with torch.no_grad():
        dense = weight.t() if layer.fan_in_fan_out else weight
        compute = torch.float64 if dense.dtype == torch.float64 else torch.float32
        dense = dense.to(compute)
        A0, B0 = pissa_factors(dense, r, scale, init)
        layer.lora_A[name].copy_(A0)
        layer.lora_B[name].copy_(B0)
        # The residual uses the stored (possibly rounded) factors, so base + s B A == W0 as
        # closely as the base dtype allows.
        A, B = layer.lora_A[name].to(compute), layer.lora_B[name].to(compute)
        residual = torch.addmm(dense, B, A, alpha=-scale)
        residual = residual.t() if layer.fan_in_fan_out else residual
        weight.copy_(residual.to(weight.dtype))
    layer.pissa_initial[name] = PissaFactors(layer.lora_A[name].detach().clone(), layer.lora_B[name].detach().clone())
