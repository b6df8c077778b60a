"""Training: data sets, the training loop, evaluation, checkpoints and run reports.

from lorakit.train import TrainConfig, train, evaluate
summary = train(TrainConfig(train="data.tsv", out="runs/x", task="classify"))
"""

from lorakit.train.data import CausalLMData, ClassificationData, Example, find_column, read_table, split_rows
from lorakit.train.metrics import causal_lm_metrics, classification_metrics

__all__ = [
    "read_table",
    "find_column",
    "split_rows",
    "Example",
    "ClassificationData",
    "CausalLMData",
    "classification_metrics",
    "causal_lm_metrics",
]
