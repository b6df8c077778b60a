"""One request's generated tokens as streamed text: incremental detokenization and stop sequences.

Decoding the whole output again at every step costs O(n) per token, O(n^2) per request. Instead
`IncrementalDetokenizer` decodes only a small window (the tokens since the last point where the
text was final, plus the step before as look-back context) - the prefix/read-offset scheme of
vLLM's `detokenize_incrementally`. The look-back matters for tokenizers whose decode depends on
neighbours (a word-level decoder joins with spaces, SentencePiece drops a leading space): the new
text is the window's decode minus the look-back's decode. A window whose text ends in U+FFFD holds
a character split across tokens (GPT-2's byte-level BPE splits "日" into three byte tokens), so its
text stays pending until the character's last byte arrives.

`RequestStream` adds stop sequences on top: it searches only the tail that could hold a new match,
holds back the characters that could still start one, never sends text after a stop, and finishes
with the text a full decode would give (cut at the earliest stop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder writes for the bytes of a character it has only part of
NOT_SENT = ("cancelled", "error")  # finish reasons whose held-back text nobody waits for


class IncrementalDetokenizer:
    """Token ids in, final text out, decoding O(1) tokens per step.

    `ids[:read]` is final text; `ids[prefix:read]` is the look-back window decoded for context
    only; `pending` is the text of `ids[read:]`, which may still change (a split character).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.pending = ""
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one id; return the text that became final with it ("" while a character is split)."""
        self.ids.append(token_id)
        window = self._decode(self.ids[self._prefix :])
        self.pending = window[len(self._prefix_text) :]
        # Nothing new (a skipped special token) or a half character: keep these tokens in the window.
        if len(window) <= len(self._prefix_text) or window.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        final, self.pending = self.pending, ""
        return final


def earliest_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop sequence in `text` starts, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


class RequestStream:
    """Turns one request's token ids into text deltas sent through `send`, cut at stop sequences.

    `add(token_id)` sends the new text that is safe to show and says whether a stop sequence has
    appeared; `finish(reason)` sends what was held back and returns the final text, which equals
    `tokenizer.decode(token_ids, skip_special_tokens=True)` cut before the earliest stop.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), send: Callable[[str], None] | None = None) -> None:
        self.stops = list(stops)
        self.stopped = False
        self._detok = IncrementalDetokenizer(tokenizer)
        self._send = send or (lambda _text: None)
        self._hold = max((len(s) - 1 for s in self.stops), default=0)  # a stop may still begin in these
        self._final: list[str] = []  # the final text, piece by piece
        self._final_len = 0
        self._recent = ""  # the final text from _recent_start on: unsent, or where a stop could begin
        self._recent_start = 0
        self._sent = 0  # characters sent
        self._end: int | None = None  # where the text is cut (a stop sequence began)

    @property
    def token_ids(self) -> list[int]:
        """The ids added so far."""
        return self._detok.ids

    @property
    def text(self) -> str:
        """The text so far (pending characters included), cut at the stop sequence if one appeared."""
        return ("".join(self._final) + self._detok.pending)[: self._end]

    def add(self, token_id: int) -> bool:
        """Take one new token id and send the new safe text; True when a stop sequence has appeared."""
        if self.stopped:
            return True
        piece = self._detok.add(token_id)
        if piece:
            self._final.append(piece)
            self._final_len += len(piece)
            self._recent += piece
        region = self._recent + self._detok.pending  # every character a new stop match could touch
        cut = earliest_stop(region, self.stops) if self.stops else -1
        if cut >= 0:
            self.stopped, self._end = True, self._recent_start + cut
            safe = self._end
        else:  # pending text may still change, and a stop may still begin in the last _hold final characters
            safe = self._final_len - self._hold
        self._send_upto(region, safe)
        self._trim()
        return self.stopped

    def _send_upto(self, region: str, safe: int) -> None:
        if safe > self._sent:
            self._send(region[self._sent - self._recent_start : safe - self._recent_start])
            self._sent = safe

    def _trim(self) -> None:
        """Forget recent text that is sent and too far back to begin a stop match: O(1) work per step."""
        keep_from = max(self._recent_start, min(self._sent, self._final_len - self._hold))
        self._recent = self._recent[keep_from - self._recent_start :]
        self._recent_start = keep_from

    def finish(self, reason: str) -> str:
        """The final text; what was held back is sent unless nobody waits for it (cancelled, error)."""
        text = self.text
        if reason not in NOT_SENT and len(text) > self._sent:
            self._send(text[self._sent :])
            self._sent = len(text)
        return text
