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
import logging
import operator
import os
import queue
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch

from lorakit import hf
from lorakit.serve.kv_batch import KVBatch, Row, zero_padding
from lorakit.serve.request import Completion, GenerationRequest, RequestError, SamplingParams, pick_token
from lorakit.train.chat import render_prompt

log = logging.getLogger(__name__)


class MultiAdapterModel(Protocol):
    """What the engine needs from `lorakit.serve.batched.MultiLoraModel`."""

    model: torch.nn.Module

    def use(self, adapters: Sequence[str | None]) -> Any: ...


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
        self.vocab_size = _vocab_size(self.model)
        self._inbox: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._waiting: deque[GenerationRequest] = deque()
        self._batch = KVBatch()  # the running rows and their KV cache
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
        for row in self._batch.rows:
            self._close(row.request, "cancelled")
        self._batch.clear()
        self._drain_inbox(block=False)
        while self._waiting:
            self._close(self._waiting.popleft(), "cancelled")

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (a string, or ids already)."""
        try:  # the tokenizer refuses some strings (a lone surrogate): the client's fault, not the server's
            if isinstance(prompt, str):
                ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            else:
                ids = [_token_id(t) for t in prompt]
        except (TypeError, ValueError) as err:
            raise RequestError(f"the prompt cannot be tokenized: {err}", param="prompt") from None
        if not ids and getattr(self.tokenizer, "bos_token_id", None) is not None:
            ids = [self.tokenizer.bos_token_id]
        return list(ids)

    def chat_prompt(self, messages: Sequence[dict[str, str]], template: str | None = None) -> str | list[int]:
        """The prompt for chat messages: `template` (the adapter's own, the one it was trained
        with), else the tokenizer's chat template, else "role: content" lines (text).

        A template's text is tokenized as training tokenizes it (train/chat.py): without the
        tokenizer's special tokens, which the template places itself (no second BOS)."""
        if template or getattr(self.tokenizer, "chat_template", None):
            text = render_prompt(self.tokenizer, messages, template)  # template None: the tokenizer's own
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
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
        self._check_ids(ids)
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
        if not self.alive:
            raise RuntimeError("the engine is not running: call start() first")
        key = adapter
        if self.registry is not None:  # loads it now if evicted; unpinned when the request ends
            key = self.registry.pin(adapter)  # this version serves the whole request, even if re-registered
        request = GenerationRequest(ids, adapter, params, loop, self.tokenizer)
        request.adapter_key = key  # what use() gets for this row: the pinned version, not the name
        self._inbox.put(request)
        return request

    def _check_ids(self, ids: list[int]) -> None:
        """Refuse ids the embedding cannot index: on CUDA one would be a device-side assert for the whole batch."""
        if self.vocab_size is None:
            return
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"token id {bad} is outside this model's vocabulary [0, {self.vocab_size})",
                param="prompt",
                code="invalid_token_id",
            )

    def generate(
        self, prompt: str | Sequence[int], adapter: str | None = None, params: SamplingParams | None = None
    ) -> Completion:
        """Submit and wait: the blocking convenience."""
        return self.submit(prompt, adapter, params).result()

    # ---------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain_inbox(block=not self._batch.rows and not self._waiting)
            if self._stop.is_set():
                break
            admitted = self._admit()
            if admitted:
                self._prefill_isolated(admitted)
            try:
                if self._batch.rows:
                    self._decode()
            except Exception as err:  # a bug or an OOM must not kill the server: fail what is in flight
                log.exception("engine step failed")
                for request in [row.request for row in self._batch.rows]:
                    if request.completion is None:
                        self._close(request, "error", error=f"{type(err).__name__}: {err}")
                self._batch.clear()

    def _prefill_isolated(self, requests: list[GenerationRequest]) -> None:
        """Prefill the newcomers together; if that fails, each alone, so only the culprit fails.

        The running batch is untouched until a prefill succeeds (its cache joins only then), so a
        newcomer's fault never ends the rows already decoding.
        """
        try:
            self._prefill(requests)
            return
        except Exception as err:
            log.exception("prefill of %d requests failed", len(requests))
            group_error = err
        for request in requests:
            if len(requests) == 1 or request.completion is not None or request.output_ids:
                self._fail(request, group_error)  # alone already, or past its prefill: nothing to retry
                continue
            self._drop_row(request)
            try:
                self._prefill([request])
            except Exception as err:
                log.exception("prefill failed")
                self._fail(request, err)

    def _fail(self, request: GenerationRequest, err: BaseException) -> None:
        """Close one request with `err`, dropping its row if it had joined the batch."""
        self._drop_row(request)
        if request.completion is None:
            self._close(request, "error", error=f"{type(err).__name__}: {err}")

    def _drop_row(self, request: GenerationRequest) -> None:
        """Remove the request's row if a failure came after its cache joined the batch."""
        keep = [i for i, row in enumerate(self._batch.rows) if row.request is not request]
        if len(keep) != len(self._batch.rows):
            self._batch.keep(keep)

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
        room = self.max_batch - len(self._batch.rows)
        if room <= 0 or not self._waiting:
            return []
        if self.mode == "continuous":
            return [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        if self._batch.rows:  # swap baseline: the running batch finishes before the next adapter's batch forms
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
            [r.adapter_key for r in requests], input_ids=ids, attention_mask=mask, position_ids=positions
        )
        zero_padding(cache, mask)  # padded slots may hold NaN from fully-masked queries; keep them inert
        rows = []
        for r in requests:
            generator = None
            if r.params.temperature > 0:
                generator = torch.Generator(device="cpu")
                # torch.seed() would reseed the global generator other threads use: draw from the OS instead
                generator.manual_seed(r.params.seed if r.params.seed is not None else int.from_bytes(os.urandom(7)))
            rows.append(Row(r, len(r.prompt_ids), 0, generator))
        self._batch.join(rows, cache, mask)
        self._advance(rows, logits)

    def _decode(self) -> None:
        batch = self._batch
        ids, mask, positions = batch.decode_inputs()
        adapters = [row.request.adapter_key for row in batch.rows]
        logits, batch.cache = self._forward(
            adapters, input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=batch.cache
        )
        self.steps += 1
        for row in batch.rows:
            row.position += 1
        self._advance(batch.rows, logits)

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Pick each row's next token, stream its text, and remove the rows that finished."""
        # greedy rows need only the argmax: one small transfer, not the whole [rows, vocab] logits
        greedy = logits.argmax(dim=-1).tolist()
        finished: list[tuple[Row, str, str | None]] = []
        for i, row in enumerate(rows):
            try:
                reason = self._step_row(row, greedy[i], logits[i])
            except Exception as err:  # one row's fault (sampling, decoding its text) ends that row only
                log.exception("request %s failed", row.request.id)
                finished.append((row, "error", f"{type(err).__name__}: {err}"))
                continue
            if reason:
                finished.append((row, reason, None))
        self.max_rows_seen = max(self.max_rows_seen, len(self._batch.rows))
        if finished:
            gone = {id(row) for row, _, _ in finished}
            self._batch.keep([i for i, row in enumerate(self._batch.rows) if id(row) not in gone])
            for row, reason, error in finished:
                self._close(row.request, reason, error=error)

    def _step_row(self, row: Row, greedy: int, logits: torch.Tensor) -> str | None:
        """Give one row its next token; the finish reason when it is done, else None."""
        request = row.request
        if request.cancelled:
            return "cancelled"
        # rows get a generator in _prefill only when they sample (temperature > 0)
        token = greedy if row.generator is None else pick_token(logits.cpu(), request.params, row.generator)
        row.last = token
        if token in self.eos_ids and not request.params.ignore_eos:
            return "stop"
        if request.output.add(token):  # streams the new text; True once a stop sequence appeared
            return "stop"
        if len(request.output_ids) >= request.params.max_tokens:
            return "length"
        return None

    def _close(self, request: GenerationRequest, reason: str, error: str | None = None) -> None:
        if self.registry is not None:
            try:
                self.registry.unpin(request.adapter_key)
            except Exception:  # the adapter may have been removed meanwhile; nothing left to release
                log.debug("unpin %r failed", request.adapter, exc_info=True)
        request.finish(reason, error)


def _token_id(value: Any) -> int:
    """A prompt id as an int; a bool or a float is a client's mistake, not a token."""
    if isinstance(value, bool):
        raise TypeError(f"token ids must be integers, not {value!r}")
    return operator.index(value)  # ints, numpy and 0-d torch integers; never a float's silent truncation


def _vocab_size(model: torch.nn.Module) -> int | None:
    """How many ids the model can embed: the smaller of config.vocab_size and the input embedding's rows."""
    sizes = [getattr(model.config, "vocab_size", None)]
    try:
        sizes.append(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError):
        pass
    sizes = [n for n in sizes if isinstance(n, int) and n > 0]
    return min(sizes) if sizes else None


def _context_length(config: Any) -> int:
    """The longest sequence the model's positions cover (2048 when the config names none)."""
    return hf.context_length(config) or 2048


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
