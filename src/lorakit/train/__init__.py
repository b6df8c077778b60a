"""Training: data sets, the training loop, evaluation, checkpoints and run reports.

from lorakit.train import TrainConfig, train, evaluate
summary = train(TrainConfig(train="data.tsv", eval="dev.tsv", out="runs/x", task="classify"))
"""

from lorakit.train.config import TrainConfig, lora_config_from_args
from lorakit.train.data import CausalLMData, ClassificationData, Example, find_column, read_table, split_rows
from lorakit.train.evaluate import evaluate
from lorakit.train.loop import Trainer, train
from lorakit.train.metrics import causal_lm_metrics, classification_metrics

__all__ = [
    "TrainConfig",
    "Trainer",
    "train",
    "evaluate",
    "lora_config_from_args",
    "read_table",
    "find_column",
    "split_rows",
    "Example",
    "ClassificationData",
    "CausalLMData",
    "classification_metrics",
    "causal_lm_metrics",
]
