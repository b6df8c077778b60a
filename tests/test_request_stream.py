"""RequestStream: streamed text against the reference full decode, with the packaged GPT tokenizer.

The packaged tokenizer is GPT-2 byte-level BPE, so "é", "日本" and emoji come out as several byte
tokens each; random id sequences also hold half characters, skipped special tokens and invalid
bytes. The reference is `tokenizer.decode(all ids, skip_special_tokens=True)` cut before the
earliest stop sequence.
"""

from __future__ import annotations

import random

import pytest
from test_engine import make_tokenizer
from transformers import AutoTokenizer

from lorakit.defaults import default_causal_lm_path
from lorakit.serve.stream import IncrementalDetokenizer, RequestStream

MULTIBYTE = "naïve café, 日本語の文章 😀🎉 über straße — ok. ñandú ∑x² 🇫🇷"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_causal_lm_path())


def reference(tokenizer, ids: list[int], stops: list[str]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


def run(tokenizer, ids: list[int], stops: list[str], reason: str = "length") -> tuple[RequestStream, list[str], int]:
    """Feed `ids` until a stop; (stream, deltas sent, ids consumed)."""
    deltas: list[str] = []
    stream = RequestStream(tokenizer, stops, send=deltas.append)
    used = 0
    for token in ids:
        used += 1
        if stream.add(token):
            break
    stream.finish(reason)
    return stream, deltas, used


def random_ids(tokenizer, rng: random.Random, n: int) -> list[int]:
    """Ids mixing byte tokens of multi-byte characters (often split mid-character), any vocabulary id, and EOS."""
    pieces = tokenizer(MULTIBYTE, add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.6:
            out.append(rng.choice(pieces))
        elif roll < 0.95:
            out.append(rng.randrange(len(tokenizer)))
        else:
            out.append(tokenizer.eos_token_id)
    return out


def test_the_packaged_tokenizer_does_split_characters_across_tokens(tokenizer):
    """The premise of the tests below: single tokens of this text decode to half characters."""
    ids = tokenizer(MULTIBYTE, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    assert tokenizer.decode(ids) == MULTIBYTE


def test_random_sequences_stream_exactly_the_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(300):
        ids = random_ids(tokenizer, rng, rng.randrange(1, 60))
        stream, deltas, _ = run(tokenizer, ids, [])
        expected = reference(tokenizer, ids, [])
        assert stream.text == expected
        assert "".join(deltas) == expected
        assert stream.token_ids == ids


def test_random_sequences_with_stop_sequences_match_the_cut_full_decode(tokenizer):
    rng = random.Random(1)
    stopped = 0
    for _ in range(300):
        ids = random_ids(tokenizer, rng, rng.randrange(1, 60))
        full = tokenizer.decode(ids, skip_special_tokens=True)
        # stops taken from the text itself (so they do occur, often across token borders), plus one that never does
        stops = ["\x00never"]
        for _ in range(rng.randrange(1, 4)):
            start = rng.randrange(max(1, len(full)))
            stops.append(full[start : start + rng.randrange(1, 5)] or "x")
        stream, deltas, used = run(tokenizer, ids, stops)
        expected = reference(tokenizer, ids[:used], stops)  # the engine generates no id after a stop
        assert stream.text == expected and "".join(deltas) == expected
        assert stream.token_ids == ids[:used]
        if stream.stopped:
            stopped += 1
            # it stopped at the first id whose text holds a stop: the text of the ids before holds none
            before = tokenizer.decode(ids[: used - 1], skip_special_tokens=True)
            assert reference(tokenizer, ids[: used - 1], stops) == before
    assert stopped > 200


def test_a_stop_split_across_two_tokens_cuts_before_it_and_nothing_after_is_sent(tokenizer):
    ids = tokenizer(" the movie was good", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids] == [" the", " movie", " was", " good"]
    deltas: list[str] = []
    stream = RequestStream(tokenizer, ["vie wa"], send=deltas.append)
    assert stream.add(ids[0]) is False and stream.add(ids[1]) is False
    assert "".join(deltas) == " the "  # the last len("vie wa") - 1 characters could begin the stop: held back
    assert stream.add(ids[2]) is True
    assert stream.finish("stop") == " the mo" and "".join(deltas) == " the mo"
    assert stream.add(ids[3]) is True and "".join(deltas) == " the mo"  # nothing after the stop, ever


def test_a_character_split_across_tokens_is_never_sent_half(tokenizer):
    ids = tokenizer(MULTIBYTE, add_special_tokens=False)["input_ids"]
    _, deltas, _ = run(tokenizer, ids, [])
    assert "".join(deltas) == MULTIBYTE
    assert not any("\ufffd" in d for d in deltas)


def test_held_back_text_is_not_sent_to_a_cancelled_request_but_is_its_text(tokenizer):
    ids = tokenizer(" abc 日本", add_special_tokens=False)["input_ids"]
    deltas: list[str] = []
    stream = RequestStream(tokenizer, ["zzz"], send=deltas.append)
    for token in ids[:-1]:  # the last byte of 本 missing
        stream.add(token)
    assert stream.finish("cancelled") == tokenizer.decode(ids[:-1])
    assert "".join(deltas) == " abc"  # " 日" and the half 本 held (a stop may begin in the last 2 characters)


def test_each_step_decodes_a_constant_number_of_tokens(tokenizer):
    """No re-decoding of the whole output: the longest decode call stays short on a long output."""
    lengths: list[int] = []

    class Counting:
        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer(MULTIBYTE * 20, add_special_tokens=False)["input_ids"]
    stream = RequestStream(Counting(), ["\x00"])
    for token in ids:
        stream.add(token)
    assert stream.finish("length") == MULTIBYTE * 20
    assert len(ids) > 500 and max(lengths) <= 8 and len(lengths) <= 2 * len(ids)


def test_a_word_level_tokenizer_joins_with_spaces_across_skipped_special_tokens():
    """The look-back window: a decoder that joins tokens with spaces, and a skipped EOS between two words."""
    tok = make_tokenizer()
    words = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    ids = [words[0], tok.eos_token_id, *words[1:], tok.eos_token_id]
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.add(i) for i in ids) + detok.pending
    assert text == tok.decode(ids, skip_special_tokens=True) == "the cat sat on the mat"
