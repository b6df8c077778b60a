"""LoRA on nn.Embedding: the update is a low-rank table, looked up like the base table.

As in loralib and PEFT, A (r, num_embeddings) starts at zero and B (dim, r) is random, so a
fresh adapter adds exactly nothing while gradients still reach A.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.core import functional as LF
from lorakit.core.layers.base import LoraLayer


class LoraEmbedding(LoraLayer):
    """LoRA over nn.Embedding (PEFT calls its tensors lora_embedding_A / lora_embedding_B)."""

    @staticmethod
    def adapter_shapes(base: nn.Module, r: int):
        return (r, base.num_embeddings), (base.embedding_dim, r)

    def reset_adapter(self, name: str, init: str) -> None:
        with torch.no_grad():
            nn.init.zeros_(self.lora_A[name])
            nn.init.normal_(self.lora_B[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        return LF.delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name]).t()

    def forward_with_adapters(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        base = self.base_layer
        result = base(x)
        for name in names:
            # Look rows of A.T up with the base table's own options (padding_idx, max_norm, ...).
            h = F.embedding(
                x,
                self.lora_A[name].t(),
                base.padding_idx,
                base.max_norm,
                base.norm_type,
                base.scale_grad_by_freq,
                base.sparse,
            )
            result = LF.add_lora_output(result, h, self.lora_B[name], self.scaling[name])
        return result
