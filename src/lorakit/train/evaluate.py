"""Loss sums and evaluation: the task's metrics over a data set, in length-sorted batches."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.train.batching import collate, pad_id_of
from lorakit.train.data import IGNORE_INDEX, CausalLMData, ClassificationData
from lorakit.train.metrics import causal_lm_metrics, classification_metrics


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy: per example (classification logits [B, C]) or per predicted
    token (causal LM logits [B, T, V], labels shifted by one, IGNORE_INDEX skipped). Sums,
    not means, so batches of any split (accumulation, processes) add up to the same loss."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a collated batch (labels are not passed: lorakit sums the loss);
    a packed batch also carries position_ids (see lorakit.train.packing)."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: Any,
    dataset: ClassificationData | CausalLMData,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """The task's metrics of `model` on `dataset`: {"accuracy", "macro_f1", "loss"} for
    classification, {"loss", "perplexity"} for a causal LM. The model's train/eval mode is
    restored afterwards. With `return_predictions`, classification adds "predictions"."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset.examples)), key=lambda i: len(dataset.examples[i].input_ids))
    pad = pad_id_of(tokenizer)
    preds: dict[int, int] = {}
    total, count = 0.0, 0
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([dataset.examples[i] for i in idx], pad, device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = forward_logits(model, batch)
            total += float(loss_sum(logits, batch["labels"]))
            if logits.dim() == 2:
                count += len(idx)
                preds.update(zip(idx, logits.argmax(-1).tolist(), strict=True))
            else:
                count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if isinstance(dataset, ClassificationData):
        predictions = [preds[i] for i in range(len(dataset.examples))]
        result: dict[str, Any] = classification_metrics(predictions, [e.label for e in dataset.examples])
        result["loss"] = total / max(count, 1)
        if return_predictions:
            result["predictions"] = predictions
        return result
    return causal_lm_metrics(total, count)
