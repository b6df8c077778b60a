"""What a client asks of the generation engine and what it gets back.

SamplingParams (OpenAI's names), the per-request event stream (text deltas, then a Completion)
for thread or asyncio consumers, and the sampling rule itself. How token ids become those text
deltas (incremental detokenization, stop sequences) is `lorakit.serve.stream.RequestStream`.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.serve.stream import RequestStream

# What torch.Generator.manual_seed accepts (an int64 or a uint64); outside it raises mid-batch.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class RequestError(LorakitError):
    """A generation request that cannot be served as asked (too long, bad parameter, unknown adapter)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI's names). temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def check(self) -> None:
        """Raise RequestError naming the first out-of-range field."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, not {self.max_tokens!r}", param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(f"temperature must be in [0, 2], not {self.temperature!r}", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], not {self.top_p!r}", param="top_p")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop must be up to 4 non-empty strings", param="stop")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise RequestError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], not {self.seed!r}", param="seed")


@dataclass
class Completion:
    """The finished output of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop sequence), "length", "cancelled" or "error"
    prompt_tokens: int
    error: str | None = None


class GenerationRequest:
    """One request's state; its events (text deltas, then the Completion) arrive in order.

    The engine feeds generated ids to `output.add(token_id)` (which sends the new text) and ends
    the request with `finish(reason)`. Consume with `stream()` (thread) or `astream()` (asyncio,
    when submitted with a loop), or wait for `result()`.
    """

    _ids = itertools.count()

    def __init__(
        self,
        prompt_ids: list[int],
        adapter: str | None,
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None,
        tokenizer: Any,
    ) -> None:
        self.id = next(self._ids)
        self.prompt_ids, self.adapter, self.params = prompt_ids, adapter, params
        self.output = RequestStream(tokenizer, params.stop, send=self._put)
        self.completion: Completion | None = None
        self.cancelled = False
        self.created = time.time()
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (a client went away)."""
        self.cancelled = True

    def _put(self, item: str | Completion) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                self.cancelled = True
        else:
            self._queue.put(item)

    @property
    def output_ids(self) -> list[int]:
        """The ids generated so far."""
        return self.output.token_ids

    def finish(self, reason: str, error: str | None = None) -> Completion:
        """End the request: send the held-back text (unless cancelled or failed), then its Completion."""
        text = self.output.finish(reason)
        self.completion = Completion(text, list(self.output_ids), reason, len(self.prompt_ids), error)
        self._put(self.completion)
        self._done.set()
        return self.completion

    def stream(self) -> Iterator[str]:
        """Text deltas as they are decoded (thread consumer); the Completion is then in `.completion`."""
        assert self._loop is None, "submitted with an event loop: use astream()"
        while True:
            item = self._queue.get()
            if isinstance(item, Completion):
                return
            yield item

    async def astream(self) -> AsyncIterator[str]:
        """Text deltas as they are decoded (asyncio consumer, submitted with `loop=`)."""
        assert self._loop is not None, "submitted without an event loop: use stream()"
        while True:
            item = await self._queue.get()
            if isinstance(item, Completion):
                return
            yield item

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request is done and return its Completion."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        assert self.completion is not None
        return self.completion


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; else temperature, then nucleus (top-p) sampling with the row's generator."""
    if params.temperature == 0 or generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
