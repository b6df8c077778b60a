"""Merging methods on dense LoRA updates (dW_i = s_i B_i A_i), the maths of PEFT's
peft.utils.merge_utils (task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties).

Each method takes the updates of one module (one per adapter) and the user's weights w_i and
returns one dense update; lorakit.tools.combine then projects it back to rank R by truncated SVD.
The weights multiply the updates after pruning (as in PEFT), and TIES elects the sign from the
pruned, *unweighted* updates, then averages the weighted ones that agree with it.

DARE's random masks come from `generator` (torch.bernoulli, drawn in float32 like PEFT on
float32 adapters), so a seeded generator gives the same merge every time, and the same draws as
PEFT's helpers after torch.manual_seed(seed) for the same tensors in the same order.
"""

from __future__ import annotations

import torch

METHODS = ("svd", "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
ALIASES = {
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}
DENSITY_METHODS = ("magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def magnitude_prune_update(update: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest |values| of `update`, zero the rest (density >= 1: all)."""
    if density >= 1:
        return update
    keep = int(density * update.numel())
    mask = torch.zeros(update.numel(), dtype=update.dtype)
    mask[torch.topk(update.abs().reshape(-1), k=keep).indices] = 1
    return update * mask.reshape(update.shape)


def random_prune_update(update: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each value with probability `density` and rescale the kept ones by 1/density."""
    if density >= 1:
        return update
    odds = torch.full(update.shape, density, dtype=torch.float32)
    mask = torch.bernoulli(odds, generator=generator).to(update.dtype)
    return update * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Which entries of the stacked updates (dim 0 = adapters) carry the elected sign: the sign of
    the sum ("total") or of the sum of signs ("frequency"); ties elect +."""
    sign = stacked.sign()
    strength = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(strength >= 0, 1, -1)
    return sign == elected


def disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the adapters (dim 0) of the entries that agree with the elected sign."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def merge_updates(
    updates: list[torch.Tensor],
    weights: list[float],
    method: str,
    density: float = 1.0,
    sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The merged dense update of one module by `method` (a name of METHODS)."""
    if method in ("magnitude_prune", "ties"):
        updates = [magnitude_prune_update(u, density) for u in updates]
    elif method in ("dare_linear", "dare_ties"):
        updates = [random_prune_update(u, density, generator) for u in updates]
    stacked = torch.stack(updates)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("ties", "dare_ties"):
        return disjoint_mean(weighted, majority_sign_mask(stacked, sign_method))
    return weighted.sum(dim=0)


def relative_residual(target: torch.Tensor, approximation: torch.Tensor) -> float:
    """||target - approximation||_F / ||target||_F (0 for a zero target)."""
    norm = float(target.norm())
    return float((target - approximation).norm()) / norm if norm > 0 else 0.0
