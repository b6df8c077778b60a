"""Generation engine: continuous batching of Hugging Face causal LMs, one adapter per row.

One engine thread owns the model. It loops: admit waiting requests (prefilled together,
left-padded, each row under its own adapter), then run one decode step over the whole running
batch, then hand every row its new token and drop the rows that finished. A request that
arrives while others decode joins the batch between two steps, whatever its adapter.

The KV cache is a transformers `DynamicCache` whose per-layer tensors are [batch, heads, time,
dim]. Rows of different lengths are left-padded; the attention mask hides the padding and
explicit `position_ids` give every row its own positions, so a row's tokens do not depend on
who shares its batch (up to float rounding). Joining a batch pads the shorter cache on the
left; leaving selects rows and trims the columns that became padding for every row.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from lorakit.errors import LorakitError

log = logging.getLogger(__name__)


class RequestError(LorakitError):
    """A generation request that cannot be served as asked (too long, bad parameter, unknown adapter)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


class MultiAdapterModel(Protocol):
    """What the engine needs from `lorakit.serve.batched.MultiLoraModel`."""

    model: torch.nn.Module

    def use(self, adapters: Sequence[str | None]) -> Any: ...


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
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, not {self.max_tokens!r}", param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(f"temperature must be in [0, 2], not {self.temperature!r}", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], not {self.top_p!r}", param="top_p")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop must be up to 4 non-empty strings", param="stop")


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

    Consume with `stream()` (thread) or `astream()` (asyncio, when submitted with a loop), or
    wait for `result()`.
    """

    _ids = itertools.count()

    def __init__(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        self.id = next(self._ids)
        self.prompt_ids, self.adapter, self.params = prompt_ids, adapter, params
        self.output_ids: list[int] = []
        self.completion: Completion | None = None
        self.cancelled = False
        self.created = time.time()
        self._emitted = 0  # characters of text already streamed
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

    def _finish(self, completion: Completion) -> None:
        self.completion = completion
        self._put(completion)
        self._done.set()

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


@dataclass
class _Row:
    request: GenerationRequest
    position: int  # position id of the next token fed to the model
    last: int  # token fed at the next decode step
    generator: torch.Generator | None


class Engine:
    """Continuous-batching generator over a multi-adapter causal LM.

    `multi` is a `MultiLoraModel` (or anything with `.model` and `.use(adapters)`); `registry`,
    when given, is pinned for each request's adapter from submit to finish. `mode="swap"` is the
    one-adapter-at-a-time baseline: a batch holds a single adapter and runs to its end before the
    next is formed (static batching grouped per adapter).
    """

    def __init__(
        self,
        multi: MultiAdapterModel,
        tokenizer: Any,
        *,
        max_batch: int = 32,
        registry: Any = None,
        mode: Literal["continuous", "swap"] = "continuous",
        max_context: int | None = None,
    ) -> None:
        if mode not in ("continuous", "swap"):
            raise ValueError(f"mode must be 'continuous' or 'swap', not {mode!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        self.multi, self.model, self.tokenizer = multi, multi.model, tokenizer
        self.model.eval()  # dropout off: a row's tokens must not depend on chance or on its batch
        self.max_batch, self.registry, self.mode = max_batch, registry, mode
        config = self.model.config
        self.max_context = max_context or _context_length(config)
        eos = getattr(config, "eos_token_id", None) or getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = next(iter(self.eos_ids), 0)
        self._keep_one = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._inbox: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._waiting: deque[GenerationRequest] = deque()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.steps = 0  # decode steps run (for tests and benchmarks)
        self.max_rows_seen = 0

    # ---------------------------------------------------------------- public API
    def start(self) -> Engine:
        """Start the engine thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the engine thread; requests still waiting or running finish as cancelled."""
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        for row in self._rows:
            self._close(row.request, "cancelled")
        self._rows, self._cache, self._mask = [], None, None
        while self._waiting:
            self._close(self._waiting.popleft(), "cancelled")

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (a string, or ids already)."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        if not ids and getattr(self.tokenizer, "bos_token_id", None) is not None:
            ids = [self.tokenizer.bos_token_id]
        return list(ids)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text for chat messages: the tokenizer's chat template, else "role: content" lines."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def submit(
        self,
        prompt: str | Sequence[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> GenerationRequest:
        """Validate and queue a request; it joins the running batch at the next step.

        Raises RequestError for a prompt that is empty or does not fit the context with
        max_tokens, or bad sampling values. With `loop`, consume it with `astream()`.
        """
        params = params or SamplingParams()
        params.check()
        ids = self.encode(prompt)
        if not ids:
            raise RequestError("the prompt is empty: give at least one token", param="prompt")
        if len(ids) >= self.max_context:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this model's context is {self.max_context}: shorten it",
                param="prompt",
                code="context_length_exceeded",
            )
        if len(ids) + params.max_tokens > self.max_context:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.max_context} tokens: ask for at most {self.max_context - len(ids)} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the engine is not running: call start() first")
        if self.registry is not None:
            self.registry.pin(adapter)  # loads it now if evicted; unpinned when the request ends
        request = GenerationRequest(ids, adapter, params, loop)
        self._inbox.put(request)
        return request

    def generate(
        self, prompt: str | Sequence[int], adapter: str | None = None, params: SamplingParams | None = None
    ) -> Completion:
        """Submit and wait: the blocking convenience."""
        return self.submit(prompt, adapter, params).result()

    # ---------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain_inbox(block=not self._rows and not self._waiting)
            if self._stop.is_set():
                break
            try:
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted)
                if self._rows:
                    self._decode()
            except Exception as err:  # a bug or an OOM must not kill the server: fail what is in flight
                log.exception("engine step failed")
                for row in self._rows:
                    self._close(row.request, "error", error=f"{type(err).__name__}: {err}")
                self._rows, self._cache, self._mask = [], None, None

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> list[GenerationRequest]:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._close(request, "cancelled")
        room = self.max_batch - len(self._rows)
        if room <= 0 or not self._waiting:
            return []
        if self.mode == "continuous":
            return [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        if self._rows:  # swap baseline: the running batch finishes before the next adapter's batch forms
            return []
        adapter = self._waiting[0].adapter
        chosen = [r for r in self._waiting if r.adapter == adapter][: self.max_batch]
        for request in chosen:
            self._waiting.remove(request)
        return chosen

    def _forward(self, adapters: list[str | None], **inputs: Any) -> tuple[torch.Tensor, Any]:
        if self._keep_one:
            inputs["logits_to_keep"] = 1
        with self.multi.use(adapters):
            out = self.model(use_cache=True, return_dict=True, **inputs)
        return out.logits[:, -1, :].float(), out.past_key_values

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        device = _device_of(self.model)
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        logits, cache = self._forward(
            [r.adapter for r in requests], input_ids=ids, attention_mask=mask, position_ids=positions
        )
        _zero_padding(cache, mask)  # padded slots may hold NaN from fully-masked queries; keep them inert
        rows = []
        for r in requests:
            generator = None
            if r.params.temperature > 0:
                generator = torch.Generator(device="cpu")
                # torch.seed() would reseed the global generator other threads use: draw from the OS instead
                generator.manual_seed(r.params.seed if r.params.seed is not None else int.from_bytes(os.urandom(7)))
            rows.append(_Row(r, len(r.prompt_ids), 0, generator))
        self._join(rows, cache, mask)
        self._advance(rows, logits)

    def _decode(self) -> None:
        assert self._mask is not None
        device = self._mask.device
        ids = torch.tensor([[row.last] for row in self._rows], dtype=torch.long, device=device)
        positions = torch.tensor([[row.position] for row in self._rows], dtype=torch.long, device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        logits, self._cache = self._forward(
            [row.request.adapter for row in self._rows],
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
        )
        self.steps += 1
        for row in self._rows:
            row.position += 1
        self._advance(self._rows, logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token, stream its text, and remove the rows that finished."""
        logits = logits.cpu()
        finished = []
        for row, row_logits in zip(rows, logits, strict=True):
            request = row.request
            if request.cancelled:
                finished.append((row, "cancelled"))
                continue
            token = _pick(row_logits, request.params, row.generator)
            row.last = token
            reason = None
            if token in self.eos_ids and not request.params.ignore_eos:
                reason = "stop"
            else:
                request.output_ids.append(token)
                if self._emit(request):
                    reason = "stop"
                elif len(request.output_ids) >= request.params.max_tokens:
                    reason = "length"
            if reason:
                finished.append((row, reason))
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        if finished:
            gone = {id(row) for row, _ in finished}
            self._leave([i for i, row in enumerate(self._rows) if id(row) not in gone])
            for row, reason in finished:
                self._close(row.request, reason)

    def _text(self, request: GenerationRequest) -> str:
        return self.tokenizer.decode(request.output_ids, skip_special_tokens=True)

    def _emit(self, request: GenerationRequest) -> bool:
        """Stream the new safe text; True when a stop sequence has appeared (text cut before it)."""
        text = self._text(request)
        stops = request.params.stop
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
            safe = len(text)
        else:
            # hold back what could still become a stop sequence, and a half-decoded character
            hold = max((len(s) - 1 for s in stops), default=0)
            safe = len(text) - hold
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > request._emitted:
            request._put(text[request._emitted : safe])
            request._emitted = safe
        return cut >= 0

    def _close(self, request: GenerationRequest, reason: str, error: str | None = None) -> None:
        text = self._text(request)
        for stop in request.params.stop:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        if reason not in ("cancelled", "error") and len(text) > request._emitted:
            request._put(text[request._emitted :])
            request._emitted = len(text)
        if self.registry is not None:
            try:
                self.registry.unpin(request.adapter)
            except Exception:  # the adapter may have been removed meanwhile; nothing left to release
                log.debug("unpin %r failed", request.adapter, exc_info=True)
        request._finish(Completion(text, list(request.output_ids), reason, len(request.prompt_ids), error))

    # ---------------------------------------------------------------- cache surgery
    def _join(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> None:
        """Append prefilled rows (their cache and mask) to the running batch, left-padding the shorter."""
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        assert self._mask is not None
        width = max(self._mask.shape[1], mask.shape[1])
        old_layers, new_layers = _layers(self._cache), _layers(cache)
        for old, new in zip(old_layers, new_layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)], dim=0)
        self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)], dim=0)
        self._rows = self._rows + rows

    def _leave(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`; drop the leading columns that are now padding for every row."""
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(dim=0).to(torch.int8).argmax())
        for layer in _layers(self._cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._mask = mask[:, start:]
        self._rows = [self._rows[i] for i in keep]


def _context_length(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"the engine needs a transformers DynamicCache, got {type(cache).__name__}")
    for layer in layers:
        if not (hasattr(layer, "keys") and hasattr(layer, "values")) or getattr(layer, "is_sliding", False):
            raise TypeError(f"cache layer {type(layer).__name__} is not supported: the engine needs full attention")
    return layers


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _zero_padding(cache: Any, mask: torch.Tensor) -> None:
    keep = mask.bool()[:, None, :, None]
    for layer in _layers(cache):
        layer.keys = layer.keys.masked_fill(~keep, 0)
        layer.values = layer.values.masked_fill(~keep, 0)


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
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
