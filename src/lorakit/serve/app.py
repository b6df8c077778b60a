"""The OpenAI-compatible HTTP app (FastAPI): routes of a few lines each over a ServeService.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), POST /v1/classify (classification bases), POST /v1/adapters,
DELETE /v1/adapters/{name}, and vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter
(200 plain text, as vLLM answers). Every error is OpenAI's body `{"error": {message, type, param, code}}`
with a 4xx status, and one bad request never stops the server. The steps a route is made of live
in `lorakit.serve.service`, the wire format (bodies in, answers out) in `lorakit.serve.schemas`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from lorakit.serve.schemas import (
    MAX_BODY,
    MAX_PATH,
    AdapterBody,
    APIError,
    ChatBody,
    ClassifyBody,
    CompletionBody,
    LoadLoraBody,
    UnloadLoraBody,
    chat_answer,
    chat_chunk,
    chat_meta,
    classify_answer,
    classify_texts,
    completion_answer,
    completion_chunk,
    completion_meta,
    completion_prompts,
    model_list,
    sse,
)
from lorakit.serve.service import ServeService, adapter_folder

__all__ = ["APIError", "CatchAll", "MAX_BODY", "MAX_PATH", "adapter_folder", "create_app", "serve_in_background"]

log = logging.getLogger(__name__)


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


def create_app(multi: Any, tokenizer: Any, registry: Any, **options: Any) -> FastAPI:
    """The app serving `multi` (a MultiLoraModel) whose adapters live in `registry` (an AdapterRegistry).

    `options` are ServeService's (base_name, api_keys, adapter_root, max_batch, max_body, mode,
    default_max_tokens). A causal LM gets a continuous-batching Engine (started and stopped with
    the app); a sequence classifier gets /v1/classify instead of the generation routes.
    """
    service = ServeService(multi, tokenizer, registry, **options)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(CatchAll)
    app.state.engine, app.state.service = service.engine, service
    _add_error_handlers(app)
    _add_model_routes(app, service)
    _add_generation_routes(app, service)
    _add_classify_route(app, service)
    _add_adapter_routes(app, service)
    _add_vllm_adapter_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(404)
    async def _no_route(request: Request, _: Exception) -> JSONResponse:
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request: Request, _: Exception) -> JSONResponse:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()


def _add_model_routes(app: FastAPI, service: ServeService) -> None:
    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        return service.health(request)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        grant = service.grant_of(request)
        return model_list(service.visible_models(grant), service.base_name, service.model_roots())


def _add_generation_routes(app: FastAPI, service: ServeService) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        grant = service.grant_of(request)  # before the body: a caller without a key learns nothing from it
        body = await service.parse(request, CompletionBody)
        jobs = await service.submit_all(grant, body, completion_prompts(body))
        meta = completion_meta(body.model)
        if body.stream:
            return sse(jobs[0], functools.partial(completion_chunk, meta))
        return completion_answer(meta, await service.finish(jobs))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        grant = service.grant_of(request)
        body = await service.parse(request, ChatBody)
        job = await service.submit(grant, body, service.chat_prompt(grant, body))
        meta = chat_meta(body.model)
        if body.stream:
            return sse(job, functools.partial(chat_chunk, meta))
        (done,) = await service.finish([job])
        return chat_answer(meta, done)


def _add_classify_route(app: FastAPI, service: ServeService) -> None:
    @app.post("/v1/classify")
    async def classify(request: Request) -> Any:
        grant = service.grant_of(request)
        body = await service.parse(request, ClassifyBody)
        service.require_classifier()
        adapter = service.adapter_for(grant, body.model)
        probs = await service.classify(adapter, classify_texts(body))
        return classify_answer(body.model, probs, service.label_names(adapter, probs.shape[-1]))


def _add_adapter_routes(app: FastAPI, service: ServeService) -> None:
    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> Any:
        service.require_admin(request, "load")
        body = await service.parse(request, AdapterBody)
        await service.load_adapter(body.name, body.path)
        return {"id": body.name, "object": "model", "owned_by": "lorakit", "parent": service.base_name}

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str, request: Request) -> Any:
        service.require_admin(request, "remove")
        await service.remove_adapter(name)
        return {"id": name, "object": "model", "deleted": True}


def _add_vllm_adapter_routes(app: FastAPI, service: ServeService) -> None:
    """vLLM's runtime adapter routes, beside /v1/adapters: the same admin key and --adapter-root
    gate them (where vLLM asks for VLLM_ALLOW_RUNTIME_LORA_UPDATING), success is vLLM's plain text."""

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(request: Request) -> str:
        service.require_admin(request, "load")
        body = await service.parse(request, LoadLoraBody)
        return await service.load_lora_adapter(body.lora_name, body.lora_path, body.load_inplace)

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(request: Request) -> str:
        service.require_admin(request, "remove")
        body = await service.parse(request, UnloadLoraBody)
        return await service.unload_lora_adapter(body.lora_name)


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
