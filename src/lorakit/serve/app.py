"""The OpenAI-compatible HTTP app (FastAPI): thin handlers over the engine and the adapter registry.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), POST /v1/classify (classification bases), POST /v1/adapters,
DELETE /v1/adapters/{name}. Every error is OpenAI's body `{"error": {message, type, param, code}}`
with a 4xx status, and one bad request never stops the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from lorakit.errors import LorakitError
from lorakit.serve.auth import Grant, find_grant
from lorakit.serve.batched import NoFreeSlotError
from lorakit.serve.engine import Engine, RequestError, SamplingParams

MAX_BODY = 1 << 20  # bytes; a prompt longer than any context fits well under this
MAX_PATH = 1024  # characters of an adapter path: far past any real folder, short of the OS's ENAMETOOLONG

log = logging.getLogger(__name__)


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


class _Body(BaseModel):
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


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


class ClassifyBody(BaseModel):
    model: str
    input: str | list[str]


class AdapterBody(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    path: str = Field(min_length=1, max_length=MAX_PATH, pattern=r"^[^\x00]+$")


class CatchAll:
    """ASGI middleware: an unexpected exception becomes a JSON 500 and the connection stays usable.

    Starlette's own handler for Exception re-raises after answering, and uvicorn then closes the
    keep-alive connection, so the client's next request on it is reset; this one swallows it.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "ended": False}

        async def tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await _answer_crash(err, state, scope, receive, send)


async def _answer_crash(err: Exception, state: dict, scope: dict, receive: Any, send: Any) -> None:
    try:
        if not state["started"]:
            error = APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error")
            await error.response()(scope, receive, send)
        elif not state["ended"]:  # mid-stream: end the body cleanly so the connection can be reused
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:  # the client is gone: nothing left to tell it
        pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _has_surrogate(data: Any) -> bool:
    """Whether a parsed body holds a lone surrogate (a JSON escape like \\ud800 that no UTF-8 can carry)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def create_app(
    multi: Any,
    tokenizer: Any,
    registry: Any,
    *,
    base_name: str,
    api_keys: dict[str, Grant] | None = None,
    adapter_root: str | Path | None = None,
    max_batch: int = 32,
    max_body: int = MAX_BODY,
    mode: str = "continuous",
    default_max_tokens: int = 16,
) -> FastAPI:
    """The app serving `multi` (a MultiLoraModel) whose adapters live in `registry` (an AdapterRegistry).

    A causal LM gets a continuous-batching Engine (started and stopped with the app); a sequence
    classifier gets /v1/classify instead of the generation routes.
    """
    multi.model.eval()  # dropout off: an answer must not depend on chance
    classifier = "ForSequenceClassification" in type(multi.model).__name__
    engine = None if classifier else Engine(multi, tokenizer, max_batch=max_batch, registry=registry, mode=mode)
    root = Path(adapter_root).resolve() if adapter_root else None
    forward_lock = threading.Lock()  # classification forwards run in the thread pool: one at a time on the model

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            engine.start()
        try:
            yield
        finally:
            if engine is not None:
                engine.stop()

    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(CatchAll)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(404)
    async def _no_route(request: Request, _: Exception) -> JSONResponse:
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request: Request, _: Exception) -> JSONResponse:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()

    # ------------------------------------------------------------------ helpers
    def models() -> list[str]:
        return [base_name, *sorted(registry.known())]

    def grant_of(request: Request) -> Grant | None:
        if api_keys is None:
            return None
        grant = find_grant(api_keys, request.headers.get("authorization"))
        if grant is None:
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        return grant

    def require_admin(request: Request, verb: str) -> None:
        grant = grant_of(request)
        if grant is not None and not grant.admin:
            raise APIError(403, f"only a '*' API key may {verb} adapters", code="forbidden")

    def adapter_for(grant: Grant | None, model: str) -> str | None:
        """The registry name for `model` (None for the base), after the key check."""
        # The grant first: a key must not learn which adapters it may not use exist (403 either way).
        if grant is not None and not grant.allows(model):
            raise APIError(403, f"this API key may not use model {model!r}", param="model", code="forbidden")
        if model != base_name and model not in registry.known():
            raise APIError(404, f"model {model!r} does not exist; GET /v1/models lists them", param="model",
                           code="model_not_found")  # fmt: skip
        return None if model == base_name else model

    async def read_body(request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes max_body (a chunked one has no length to check first)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:  # refuse before reading it into memory
            raise APIError(413, f"request body is {declared} bytes; the limit is {max_body}", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise APIError(413, f"request body is over the limit of {max_body} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        raw = await read_body(request)
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except RecursionError:  # nesting deeper than the interpreter's stack: no request needs that
            raise APIError(400, "the body is not valid JSON: nested too deeply", code="invalid_json") from None
        except ValueError as err:  # also bad UTF-8, NaN/Infinity, and integers over Python's digit limit
            raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
        if _has_surrogate(data):
            raise APIError(400, "the body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value") from None
        except RecursionError:
            raise APIError(400, "the body is nested too deeply", code="invalid_value") from None

    async def submit(grant: Grant | None, body: _Body, prompt: Any) -> Any:
        if engine is None:
            raise APIError(400, "this base model is a classifier: use POST /v1/classify", code="unsupported")
        adapter = adapter_for(grant, body.model)
        max_tokens = body.max_tokens or body.max_completion_tokens or default_max_tokens
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, stop)
        try:  # pinning may read the adapter from disk: off the event loop
            return await run_in_threadpool(engine.submit, prompt, adapter, params, loop=asyncio.get_running_loop())
        except RequestError as err:
            raise APIError(err.status, str(err), param=err.param, code=err.code) from None
        except NoFreeSlotError as err:  # every slot pinned by running requests: the client may retry
            raise APIError(429, str(err), type="rate_limit_error", param="model", code="no_free_slot") from None
        except LorakitError as err:  # the registry refused the adapter (removed meanwhile, bad files)
            raise APIError(400, str(err), param="model") from None

    def usage(done: list[Any]) -> dict[str, int]:
        prompt = sum(c.prompt_tokens for c in done)
        completion = sum(len(c.token_ids) for c in done)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def finish(jobs: list[Any]) -> list[Any]:
        try:
            for job in jobs:
                async for _ in job.astream():
                    pass
        finally:  # the client went away: stop decoding for it
            for job in jobs:
                job.cancel()
        for job in jobs:
            if job.completion.finish_reason == "error":
                raise APIError(500, f"generation failed: {job.completion.error}", type="server_error")
        return [job.completion for job in jobs]

    def sse(job: Any, chunk: Any) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                async for delta in job.astream():
                    yield f"data: {json.dumps(chunk(delta, None))}\n\n"
                yield f"data: {json.dumps(chunk(None, job.completion.finish_reason))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        alive = engine is None or engine.alive
        answer = {"status": "ok" if alive else "engine stopped", "model": base_name}
        try:  # probes come without a key: they learn the server is up, not which adapters it holds
            grant = grant_of(request)
        except APIError:
            return answer
        answer["adapters"] = [n for n in sorted(registry.known()) if grant is None or grant.allows(n)]
        return answer

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        grant = grant_of(request)
        now = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "lorakit",
                "parent": None if i == 0 else base_name,
            }
            for i, name in enumerate(models())
            if grant is None or grant.allows(name)
        ]
        return {"object": "list", "data": data}

    async def submit_all(grant: Grant | None, body: _Body, prompts: list[Any]) -> list[Any]:
        jobs: list[Any] = []
        try:
            for prompt in prompts:
                jobs.append(await submit(grant, body, prompt))
        except BaseException:  # a later prompt was refused: the earlier ones must not run for nobody
            for job in jobs:
                job.cancel()
            raise
        return jobs

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        grant = grant_of(request)  # before the body: a caller without a key learns nothing from it
        body = await parse(request, CompletionBody)
        prompts = (
            body.prompt
            if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str)
            else [body.prompt]
        )
        if body.stream and len(prompts) != 1:
            raise APIError(400, "streaming takes one prompt, not a list", param="prompt")
        if len(prompts) > 256:
            raise APIError(400, "prompt must hold 1 to 256 strings", param="prompt")
        jobs = await submit_all(grant, body, prompts)
        meta = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }
        if body.stream:

            def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
                return {
                    **meta,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}],
                }

            return sse(jobs[0], chunk)
        done = await finish(jobs)
        choices = [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason} for i, c in enumerate(done)
        ]
        return {**meta, "choices": choices, "usage": usage(done)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        grant = grant_of(request)
        body = await parse(request, ChatBody)
        if engine is None:
            raise APIError(400, "this base model is a classifier: use POST /v1/classify", code="unsupported")
        adapter_for(grant, body.model)  # the key check before the chat template runs
        try:
            prompt = engine.chat_prompt([m.model_dump() for m in body.messages])
        except Exception as err:  # a template may refuse roles or orders (jinja raises its own errors)
            raise APIError(400, f"the messages do not fit the chat template: {err}", param="messages") from None
        job = await submit(grant, body, prompt)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:

            def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
                delta = {} if reason else {"role": "assistant", "content": text}
                return {
                    **meta,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
                }

            return sse(job, chunk)
        (done,) = await finish([job])
        message = {"role": "assistant", "content": done.text}
        choice = {"index": 0, "message": message, "finish_reason": done.finish_reason}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage([done])}

    @app.post("/v1/classify")
    async def classify(request: Request) -> Any:
        grant = grant_of(request)
        body = await parse(request, ClassifyBody)
        if not classifier:
            raise APIError(400, "this base model is a causal LM: use /v1/completions", code="unsupported")
        adapter = adapter_for(grant, body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > 256:
            raise APIError(400, "input must hold 1 to 256 strings", param="input")

        def run() -> torch.Tensor:
            limit = getattr(tokenizer, "model_max_length", 512)
            batch = tokenizer(texts, padding=True, truncation=True, max_length=min(limit, 4096), return_tensors="pt")
            device = next(multi.model.parameters()).device
            if registry is not None:
                registry.pin(adapter)
            try:
                with forward_lock, torch.no_grad(), multi.use([adapter] * len(texts)):
                    return multi.model(**batch.to(device)).logits.float().softmax(-1).cpu()
            finally:
                if registry is not None:
                    registry.unpin(adapter)

        try:
            probs = await run_in_threadpool(run)
        except LorakitError as err:
            raise APIError(400, str(err), param="model") from None
        names = getattr(multi.model.config, "id2label", None) or {}
        data = []
        for i, row in enumerate(probs):
            table = {str(names.get(j, j)): round(float(p), 6) for j, p in enumerate(row)}
            data.append(
                {"index": i, "label": str(names.get(int(row.argmax()), int(row.argmax()))), "probabilities": table}
            )
        return {"object": "list", "model": body.model, "data": data}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> Any:
        require_admin(request, "load")
        body = await parse(request, AdapterBody)
        if root is None:
            raise APIError(
                403, "this server was started without --adapter-root: adapters cannot be loaded", param="path"
            )
        path = adapter_folder(root, body.path)
        if body.name == base_name:
            raise APIError(409, f"{body.name!r} is the base model's name: pick another", param="name")
        try:
            await run_in_threadpool(registry.register, body.name, path)
        except (LorakitError, OSError) as err:  # OSError: the folder changed or is unreadable under us
            raise APIError(400, str(err), param="path", code="invalid_adapter") from None
        return {"id": body.name, "object": "model", "owned_by": "lorakit", "parent": base_name}

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str, request: Request) -> Any:
        require_admin(request, "remove")
        if name not in registry.known():
            raise APIError(404, f"adapter {name!r} is not loaded", param="name", code="model_not_found")
        try:
            await run_in_threadpool(registry.remove, name)
        except LorakitError as err:
            raise APIError(409, str(err), param="name") from None
        return {"id": name, "object": "model", "deleted": True}

    return app


def adapter_folder(root: Path, given: str) -> Path:
    """The folder `given` names under `root`: 403 outside it, 404 missing, 400 unresolvable (a symlink loop)."""
    try:
        path = (root / given).resolve()
        inside = path.is_relative_to(root)
        is_dir = inside and path.is_dir()
    except (OSError, RuntimeError, ValueError) as err:  # RuntimeError: Python 3.11's "Symlink loop"
        raise APIError(400, f"path {given[:200]!r} cannot be resolved: {err}"[:500], param="path",
                       code="invalid_path") from None  # fmt: skip
    if not inside:
        raise APIError(403, f"path {given!r} is outside the adapter root", param="path", code="path_not_allowed")
    if not is_dir:
        raise APIError(404, f"no adapter folder {given!r} under the adapter root", param="path", code="not_found")
    return path


def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> tuple[Any, threading.Thread, int]:
    """Run `app` under uvicorn in a daemon thread (tests, benchmarks); returns (server, thread, port).

    Stop it with `server.should_exit = True; thread.join()`.
    """
    import socket

    import uvicorn

    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="lorakit-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread, port
