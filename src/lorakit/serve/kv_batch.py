"""The running batch of the generation engine: its rows and their KV cache, joined and split between steps.

Rows of different lengths are left-padded: `mask` [rows, time] marks the real cache slots, and
every row keeps its own next position. A joining group of rows (prefilled together) is padded
on the left to the common width; leaving rows are dropped and the leading columns that became
padding for every remaining row are trimmed, so the cache never grows past the longest row.
Works on transformers' DynamicCache, whose per-layer `keys`/`values` are [rows, heads, time, dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Row:
    """One running request: what the next decode step feeds for it."""

    request: Any  # GenerationRequest
    position: int  # position id of the next token fed to the model
    last: int  # token fed at the next decode step
    generator: torch.Generator | None


class KVBatch:
    """Rows, their DynamicCache and attention mask; empty when no request runs."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None

    def clear(self) -> None:
        """Forget every row and the cache."""
        self.rows, self.cache, self.mask = [], None, None

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [rows, 1], the attention mask grown by the new column, position_ids [rows, 1]."""
        assert self.mask is not None
        device = self.mask.device
        ids = torch.tensor([[row.last] for row in self.rows], dtype=torch.long, device=device)
        positions = torch.tensor([[row.position] for row in self.rows], dtype=torch.long, device=device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        return ids, self.mask, positions

    def join(self, rows: list[Row], cache: Any, mask: torch.Tensor) -> None:
        """Append prefilled rows (their cache and mask) to the running batch, left-padding the shorter."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        assert self.mask is not None
        width = max(self.mask.shape[1], mask.shape[1])
        old_layers, new_layers = _layers(self.cache), _layers(cache)
        for old, new in zip(old_layers, new_layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)], dim=0)
        self.rows = self.rows + rows

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`; drop the leading columns that are now padding for every row."""
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        assert self.mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).to(torch.int8).argmax())
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]
        self.rows = [self.rows[i] for i in keep]


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"the engine needs a transformers DynamicCache, got {type(cache).__name__}")
    for layer in layers:
        if not (hasattr(layer, "keys") and hasattr(layer, "values")) or getattr(layer, "is_sliding", False):
            raise TypeError(f"cache layer {type(layer).__name__} is not supported: the engine needs full attention")
    return layers


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def zero_padding(cache: Any, mask: torch.Tensor) -> None:
    keep = mask.bool()[:, None, :, None]
    for layer in _layers(cache):
        layer.keys = layer.keys.masked_fill(~keep, 0)
        layer.values = layer.values.masked_fill(~keep, 0)
