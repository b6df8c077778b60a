"""Packing (lorakit.train.packing): a packed row computes what each of its examples computes alone.

The reference is each example run by itself through the same tiny GPT-2 / Llama (fp32, eval
mode): the packed logits of every example's tokens and the summed loss must match.
"""

from __future__ import annotations

import pytest
import tiny
import torch
import torch.nn as nn

from lorakit.errors import UsageError
from lorakit.train.data import IGNORE_INDEX, Example
from lorakit.train.evaluate import loss_sum
from lorakit.train.packing import block_causal_mask, check_packing, collate_packed, pack, packing_refusal

LENGTHS = (5, 9, 3, 12, 7, 1, 4)


def _examples(lengths=LENGTHS, seed=0) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(1, 100, (n,), generator=generator).tolist()
        # Some tokens ignored, as prompt tokens are in chat data; the first is learned, so that
        # packing must ignore it (else it would be predicted from the previous example).
        labels = [IGNORE_INDEX if k % 3 == 1 else t for k, t in enumerate(ids)]
        examples.append(Example(ids, labels))
    return examples


def test_first_fit_decreasing_layout():
    rows = pack(_examples(), max_length=16)
    # Longest first into the first row with room: 12 -> A, 9 -> B, 7 -> B, 5 -> C, 4 -> A, 3 -> C, 1 -> C.
    assert [r.lengths for r in rows] == [[12, 4], [9, 7], [5, 3, 1]]


def test_every_example_lands_once_with_its_own_positions_and_first_label_ignored():
    examples = _examples()
    rows = pack(examples, max_length=16)
    found = []
    for row in rows:
        assert len(row.input_ids) <= 16
        start = 0
        for n in row.lengths:
            found.append(row.input_ids[start : start + n])
            assert row.position_ids[start : start + n] == list(range(n))
            assert row.labels[start] == IGNORE_INDEX
            start += n
    assert sorted(found) == sorted(e.input_ids for e in examples)
    assert sum(r.weight for r in rows) == sum(e.weight for e in examples)


def test_too_long_example_is_refused():
    with pytest.raises(UsageError, match="13 tokens does not fit --max-length 12"):
        pack(_examples((4, 13)), max_length=12)


def test_block_causal_mask_matches_a_loop_built_reference():
    lengths, width = [3, 1, 2], 8
    segment = [0, 0, 0, 1, 2, 2, 3, 4]  # padding positions each on their own
    expected = torch.tensor(
        [
            [0.0 if k <= q and segment[k] == segment[q] else torch.finfo(torch.float32).min for k in range(width)]
            for q in range(width)
        ]
    )
    assert torch.equal(block_causal_mask(lengths, width)[0, 0], expected)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("make", [tiny.gpt2, tiny.llama], ids=["gpt2", "llama"])
def test_packed_logits_and_loss_equal_each_example_alone(make, implementation):
    model = make(seed=0).eval()
    model.config._attn_implementation = implementation
    assert packing_refusal(model) is None
    examples = _examples()
    rows = pack(examples, max_length=16)
    batch = collate_packed(rows, pad_id=0)
    assert batch["attention_mask"].shape == (len(rows), 1, 16, 16)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        alone = {tuple(e.input_ids): model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples}
        for b, row in enumerate(rows):
            start = 0
            for n in row.lengths:
                ids = tuple(row.input_ids[start : start + n])
                torch.testing.assert_close(packed[b, start : start + n], alone[ids], atol=1e-5, rtol=0)
                start += n
        reference = sum(float(loss_sum(alone[tuple(e.input_ids)][None], torch.tensor([e.label]))) for e in examples)
    assert float(loss_sum(packed, batch["labels"])) == pytest.approx(reference, abs=1e-4)


class _NoPositions(nn.Module):
    def forward(self, input_ids, attention_mask=None):
        return input_ids


def test_models_that_cannot_pack_are_refused_with_a_reason():
    assert "takes no position_ids" in packing_refusal(_NoPositions())
    model = tiny.llama(seed=0)
    model.config._attn_implementation = "flash_attention_2"
    reason = packing_refusal(model)
    assert "'flash_attention_2'" in reason and "\n" not in reason
    with pytest.raises(UsageError, match="^--packing: attention implementation"):
        check_packing(model)
