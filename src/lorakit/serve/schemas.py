"""OpenAI's wire format for the server: request bodies in (read, parsed, validated), answers out.

Every refusal is an APIError, answered as OpenAI's body `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorakit.serve.request import SamplingParams

MAX_BODY = 1 << 20  # bytes; a prompt longer than any context fits well under this
MAX_PATH = 1024  # characters of an adapter path: far past any real folder, short of the OS's ENAMETOOLONG
MAX_PROMPTS = 256  # strings in one completions prompt list or one classify input


class APIError(Exception):
    """An error answered as OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# ---------------------------------------------------------------------------------- request bodies
class GenerationBody(BaseModel):
    """The sampling fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs: null, ...)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)


class ClassifyBody(BaseModel):
    model: str
    input: str | list[str]


AdapterName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]
AdapterPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH, pattern=r"^[^\x00]+$")]


class AdapterBody(BaseModel):
    name: AdapterName
    path: AdapterPath


class LoadLoraBody(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body (its lora_int_id and other extras are ignored)."""

    lora_name: AdapterName
    lora_path: AdapterPath
    load_inplace: bool = False


class UnloadLoraBody(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body."""

    lora_name: AdapterName


# ---------------------------------------------------------------------------------- reading a body
async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (a chunked one has no length to check first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refuse before reading it into memory
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _has_surrogate(data: Any) -> bool:
    """Whether a parsed body holds a lone surrogate (a JSON escape like \\ud800 that no UTF-8 can carry)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_json(raw: bytes) -> Any:
    """Strict JSON: no NaN/Infinity, no lone surrogates, no nesting past the interpreter's stack."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:  # nesting deeper than the interpreter's stack: no request needs that
        raise APIError(400, "the body is not valid JSON: nested too deeply", code="invalid_json") from None
    except ValueError as err:  # also bad UTF-8, NaN/Infinity, and integers over Python's digit limit
        raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
    if _has_surrogate(data):
        raise APIError(400, "the body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)", code="invalid_json")
    return data


def validate(schema: type[BaseModel], data: Any) -> Any:
    """`data` as a `schema`; a 400 naming the first bad field."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value") from None
    except RecursionError:
        raise APIError(400, "the body is nested too deeply", code="invalid_value") from None


# ---------------------------------------------------------------------------------- what a body asks
def sampling_params(body: GenerationBody, default_max_tokens: int) -> SamplingParams:
    """The engine's settings for a generation body."""
    max_tokens = body.max_tokens or body.max_completion_tokens or default_max_tokens
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, stop)


def completion_prompts(body: CompletionBody) -> list[Any]:
    """The prompts of a completions body: a list of strings is several, anything else (a string, ids) one."""
    prompt = body.prompt
    prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else [prompt]
    if body.stream and len(prompts) != 1:
        raise APIError(400, "streaming takes one prompt, not a list", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"prompt must hold 1 to {MAX_PROMPTS} strings", param="prompt")
    return prompts


def classify_texts(body: ClassifyBody) -> list[str]:
    """The texts of a classify body, 1 to MAX_PROMPTS of them."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or len(texts) > MAX_PROMPTS:
        raise APIError(400, f"input must hold 1 to {MAX_PROMPTS} strings", param="input")
    return texts


# ---------------------------------------------------------------------------------- answers
def usage(done: list[Any]) -> dict[str, int]:
    """OpenAI's token counts over finished Completions."""
    prompt = sum(c.prompt_tokens for c in done)
    completion = sum(len(c.token_ids) for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def model_list(names: list[str], base_name: str, roots: dict[str, str] | None = None) -> dict[str, Any]:
    """GET /v1/models: the base first, then its adapters (parent: the base), as vLLM's cards:
    `root` is `roots[name]` (what ServeService.model_root shows), else the name itself."""
    now, roots = int(time.time()), roots or {}
    data = [
        {"id": name, "object": "model", "created": now, "owned_by": "lorakit", "root": roots.get(name, name),
         "parent": None if name == base_name else base_name}
        for name in names
    ]  # fmt: skip
    return {"object": "list", "data": data}


def completion_meta(model: str) -> dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model}


def completion_answer(meta: dict[str, Any], done: list[Any]) -> dict[str, Any]:
    choices = [
        {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason} for i, c in enumerate(done)
    ]
    return {**meta, "choices": choices, "usage": usage(done)}


def completion_chunk(meta: dict[str, Any], text: str | None, reason: str | None) -> dict[str, Any]:
    """One server-sent event of a streamed completion (the last one carries the finish reason)."""
    return {**meta, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}


def chat_meta(model: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def chat_answer(meta: dict[str, Any], done: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": done.text}
    choice = {"index": 0, "message": message, "finish_reason": done.finish_reason}
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage([done])}


def chat_chunk(meta: dict[str, Any], text: str | None, reason: str | None) -> dict[str, Any]:
    """One server-sent event of a streamed chat answer (the last one: an empty delta and the finish reason)."""
    delta = {} if reason else {"role": "assistant", "content": text}
    return {
        **meta,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
    }


def sse(job: Any, chunk: Callable[[str | None, str | None], dict[str, Any]]) -> StreamingResponse:
    """Stream `job`'s text deltas as server-sent events, then its finish reason, then [DONE]."""

    async def events() -> AsyncIterator[str]:
        try:
            async for delta in job.astream():
                yield f"data: {json.dumps(chunk(delta, None))}\n\n"
            yield f"data: {json.dumps(chunk(None, job.completion.finish_reason))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away: stop decoding for it
            job.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")


def classify_answer(model: str, probs: Any, id2label: dict | None) -> dict[str, Any]:
    """/v1/classify: per text, the top label and every label's probability."""
    names = id2label or {}
    data = []
    for i, row in enumerate(probs):
        table = {str(names.get(j, j)): round(float(p), 6) for j, p in enumerate(row)}
        top = int(row.argmax())
        data.append({"index": i, "label": str(names.get(top, top)), "probabilities": table})
    return {"object": "list", "model": model, "data": data}
