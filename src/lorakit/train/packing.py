"""Packing: several short tokenized examples in one full-length row, with no attention between them.

Rows are filled first-fit decreasing (longest example first, into the first row with room), which
wastes little space; the order of examples is lost, which is harmless since the batch plan
shuffles rows anyway. Inside a row every example keeps its own positions (position_ids restart
at 0) and a block-diagonal causal mask keeps attention inside it, so each example's logits are
those it would get alone. The first label of every example is IGNORE_INDEX: after the shift of
the causal-LM loss it would be predicted from the previous example's last token.

transformers 5.x takes a prepared 4-D attention mask of shape (batch, 1, q, k) as-is
(masking_utils._preprocess_mask_arguments) for the eager and sdpa attention implementations; eager
adds it to the scores, so it must be additive float (0 = attend, dtype minimum = blocked), which
sdpa accepts too. Flash attention takes no 4-D mask (it packs through position_ids alone), so
such models are refused rather than silently attending across examples.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lorakit.errors import UsageError
from lorakit.train.data import IGNORE_INDEX, Example

MASKED_ATTENTION = ("eager", "sdpa")  # implementations that apply a 4-D additive mask as given


@dataclass
class PackedRow:
    """Examples laid end to end: ids, labels, per-example positions and each example's length."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def weight(self) -> int:
        """Loss terms in the row: the predicted tokens of its examples (as Example.weight counts them)."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def add(self, example: Example) -> None:
        """Append `example`, its positions restarting at 0 and its first label ignored."""
        n = len(example.input_ids)
        self.input_ids += example.input_ids
        self.labels += [IGNORE_INDEX, *example.label[1:]]
        self.position_ids += range(n)
        self.lengths.append(n)


def pack(examples: Sequence[Example], max_length: int) -> list[PackedRow]:
    """First-fit decreasing: each example, longest first, goes into the first row with room
    (ties keep input order, so the result is deterministic). An example longer than
    `max_length` is a UsageError (truncate before packing)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[PackedRow] = []
    free: list[int] = []  # room left in each row
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_length:
            raise UsageError(f"an example of {n} tokens does not fit --max-length {max_length}; truncate it first")
        slot = next((r for r, room in enumerate(free) if room >= n), None)
        if slot is None:
            rows.append(PackedRow())
            free.append(max_length)
            slot = len(rows) - 1
        rows[slot].add(examples[i])
        free[slot] -= n
    return rows


def block_causal_mask(lengths: Sequence[int], width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (1, 1, width, width) mask: a token sees earlier tokens of its own example only.
    Positions past sum(lengths) (padding) see only themselves, so no row of scores is all blocked."""
    segment = torch.arange(width)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths), dtype=torch.long))
    segment[: len(ids)] = ids
    segment[len(ids) :] = torch.arange(len(lengths), len(lengths) + width - len(ids))
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
    mask = torch.zeros(width, width, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def collate_packed(
    rows: Sequence[PackedRow], pad_id: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A batch of packed rows, right-padded to the longest: input_ids, labels (padding ignored),
    position_ids and the 4-D block-diagonal attention_mask in the model's compute `dtype`."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        positions[b, :n] = torch.tensor(row.position_ids)
    mask = torch.cat([block_causal_mask(r.lengths, width, dtype) for r in rows])
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
    return {k: v.to(device) for k, v in batch.items()}


def packing_refusal(model: torch.nn.Module) -> str | None:
    """Why `model` cannot train on packed rows (one line), or None when it can."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__} takes no position_ids, so packed examples would not restart their positions"
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in MASKED_ATTENTION:
        return (
            f"attention implementation {implementation!r} does not apply a 4-D block mask; "
            f"load the model with attn_implementation 'sdpa' or 'eager', or train without --packing"
        )
    return None


def check_packing(model: torch.nn.Module) -> None:
    """UsageError when `model` cannot train on packed rows."""
    reason = packing_refusal(model)
    if reason is not None:
        raise UsageError(f"--packing: {reason}")
