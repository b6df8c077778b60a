"""Batches: length-grouped batch plans and dynamic padding (never to a fixed maximum length).

A plan is a list of *global* batches (example indices) for one epoch, a pure function of
(lengths, batch size, seed, epoch): every process of a distributed run computes the same plan
and takes its own slice, and a resumed run finds its place by the step number alone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lorakit import hf
from lorakit.train.config import TrainConfig
from lorakit.train.data import IGNORE_INDEX, Example

# Examples are sorted by length inside windows of this many batches: batches have little
# padding, yet their order (and each batch's mix) stays random from epoch to epoch.
GROUP_WINDOW = 50

# Small-data default, used when neither --epochs nor --max-steps is given. One epoch of 170
# examples at batch 32 is 6 optimizer steps, which with warm-up and decay barely moves a fresh
# head off the majority class. So a run takes at least MIN_AUTO_STEPS steps (about what the
# recipe's lr 2e-3 needs to converge on SST-2-sized tasks: its 1-epoch quality figure is ~600
# steps, and 100 is where the loss curve flattens on a few hundred examples), in whole epochs,
# but never more than MAX_AUTO_EPOCHS passes: beyond that a tiny data set is memorised, which
# more steps cannot fix. Data with >= 100 steps per epoch trains one epoch, as always.
MIN_AUTO_STEPS = 100
MAX_AUTO_EPOCHS = 20


def auto_epochs(steps_per_epoch: int) -> int:
    """Epochs when the user set neither --epochs nor --max-steps: 1, or enough whole epochs
    for MIN_AUTO_STEPS optimizer steps, capped at MAX_AUTO_EPOCHS."""
    return max(1, min(MAX_AUTO_EPOCHS, math.ceil(MIN_AUTO_STEPS / max(steps_per_epoch, 1))))


def plan_epoch(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """Global batches of example indices for `epoch`: shuffled, then (optionally) sorted by
    length within windows of GROUP_WINDOW batches, and the batch order shuffled again."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * GROUP_WINDOW
        grouped = []
        for start in range(0, len(order), window):
            grouped += sorted(order[start : start + window], key=lambda i: -lengths[i])
        order = grouped
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        # Keep the longest batch first: a memory problem shows at step 1, not hours in.
        head, rest = batches[:1], batches[1:]
        rng.shuffle(rest)
        batches = head + rest
    return batches


@dataclass
class StepPlan:
    """Which examples each optimizer step of a run trains on, and how many steps there are.

    Step `s` (1-based) of the endless stream of epochs takes the examples of one global batch
    of `step_size` = batch_size x processes x grad_accum; it is cut into micro-batches of
    `global_batch` (one per accumulation step, each split over the processes). The examples
    of a step do not depend on that split, so every split computes the same update."""

    lengths: list[int]  # tokens of each training example
    global_batch: int  # one micro-batch over all processes
    step_size: int  # examples per optimizer step
    seed: int
    group_by_length: bool
    total_steps: int
    warmup_steps: int
    epochs: float | None = None  # the epochs chosen by auto_epochs (None: the user set the length)
    _epochs: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)  # the current epoch's plan

    @classmethod
    def of(cls, config: TrainConfig, lengths: list[int], world: int) -> StepPlan:
        """The plan of `config` over examples of `lengths` tokens with `world` processes."""
        global_batch = config.batch_size * world
        step_size = global_batch * config.grad_accum
        steps_per_epoch = math.ceil(len(lengths) / step_size)
        chosen = auto_epochs(steps_per_epoch) if config.epochs is None and config.max_steps is None else None
        epochs = chosen if chosen is not None else config.epochs if config.epochs is not None else 1.0
        total = config.max_steps or max(1, math.ceil(epochs * steps_per_epoch))
        warmup = int(config.warmup) if config.warmup >= 1 else round(config.warmup * total)
        return cls(lengths, global_batch, step_size, config.seed, config.group_by_length, total, warmup, chosen)

    def length_note(self) -> str | None:
        """One line saying how long the run is when auto_epochs chose it for small data, else None."""
        if self.epochs is None or self.epochs == 1:
            return None
        return (
            f"lorakit train: {len(self.lengths)} examples are {self.steps_per_epoch} steps per epoch, so training "
            f"{self.epochs} epochs ({self.total_steps} steps; at least {MIN_AUTO_STEPS}, at most {MAX_AUTO_EPOCHS} "
            "epochs); set --epochs or --max-steps to choose"
        )

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the data (the last one may be short)."""
        return math.ceil(len(self.lengths) / self.step_size)

    def micro_batches(self, step: int) -> list[list[int]]:
        """The global micro-batches (example indices) of optimizer step `step` (1-based)."""
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        if epoch not in self._epochs:  # only one epoch's plan is kept
            self._epochs = {epoch: plan_epoch(self.lengths, self.step_size, self.seed, epoch, self.group_by_length)}
        examples = self._epochs[epoch][index]
        return [examples[i : i + self.global_batch] for i in range(0, len(examples), self.global_batch)]


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's part of a global batch (every world-th example)."""
    return batch[rank::world]


def collate(examples: list[Example], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """input_ids / attention_mask padded on the right to the batch's longest example, and
    labels (a class id per example, or token labels padded with IGNORE_INDEX)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    token_labels = not isinstance(examples[0].label, int)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if token_labels else None
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        if token_labels:
            labels[row, :n] = torch.tensor(example.label)
    if not token_labels:
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def pad_id_of(tokenizer) -> int:
    """The padding token id (lorakit.hf decides it, for training and serving alike)."""
    return hf.pad_token_id(tokenizer)
