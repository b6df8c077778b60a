"""Task metrics: accuracy and macro-F1 for classification, loss and perplexity for causal LMs."""

from __future__ import annotations

import math
from collections.abc import Sequence


def classification_metrics(preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """{"accuracy", "macro_f1"}; macro-F1 averages F1 over the classes present in preds or labels."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not labels:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    correct = sum(int(p == t) for p, t in zip(preds, labels, strict=True))
    f1s = []
    for c in sorted(set(preds) | set(labels)):
        tp = sum(1 for p, t in zip(preds, labels, strict=True) if p == c and t == c)
        fp = sum(1 for p, t in zip(preds, labels, strict=True) if p == c and t != c)
        fn = sum(1 for p, t in zip(preds, labels, strict=True) if p != c and t == c)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": correct / len(labels), "macro_f1": sum(f1s) / len(f1s)}


def causal_lm_metrics(total_loss: float, tokens: int) -> dict[str, float]:
    """{"loss", "perplexity"} from a summed token cross-entropy and its token count."""
    loss = total_loss / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


# Which eval metric picks the best adapter, and whether higher is better.
BEST_METRIC = {"classify": ("accuracy", True), "causal-lm": ("loss", False)}
