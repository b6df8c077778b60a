"""What the server's routes call: one object holding the model, its adapter registry, the engine,
the API keys and the limits. Each method does one step of a request (check the key, read the
body, find the adapter, generate, classify, load an adapter) and turns every refusal into an
APIError with OpenAI's status, message and code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from fastapi import Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from lorakit import hf
from lorakit.errors import LorakitError
from lorakit.serve.auth import Grant, find_grant
from lorakit.serve.batched import NoFreeSlotError
from lorakit.serve.engine import Engine, RequestError
from lorakit.serve.request import GenerationRequest
from lorakit.serve.schemas import MAX_BODY, APIError, GenerationBody, parse_json, read_body, sampling_params, validate

log = logging.getLogger(__name__)
CLASSIFIER_ONLY = "this base model is a classifier: use POST /v1/classify"


def is_sequence_classifier(model: Any) -> bool:
    """Whether the base answers /v1/classify (a ...ForSequenceClassification) rather than generating."""
    return hf.model_task(model) == hf.CLASSIFY


def input_limit(model: Any, tokenizer: Any) -> int:
    """The longest input the classifier takes: its positions and its tokenizer's limit, the
    smaller (512 when neither says)."""
    return hf.context_length(getattr(model, "config", None), tokenizer) or 512


class ServeService:
    """The state one server holds and the steps its routes are made of.

    A causal LM gets a continuous-batching Engine (`start`/`stop` with the app); a sequence
    classifier gets `classify` instead of the generation steps.
    """

    def __init__(
        self,
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
    ) -> None:
        multi.model.eval()  # dropout off: an answer must not depend on chance
        self.multi, self.tokenizer, self.registry = multi, tokenizer, registry
        self.base_name, self.api_keys, self.max_body = base_name, api_keys, max_body
        self.default_max_tokens = default_max_tokens
        self.classifier = is_sequence_classifier(multi.model)
        self.engine = None if self.classifier else Engine(multi, tokenizer, max_batch=max_batch, registry=registry,
                                                          mode=mode)  # fmt: skip
        self.root = Path(adapter_root).resolve() if adapter_root else None
        self._forward_lock = threading.Lock()  # classification forwards run in the thread pool: one at a time

    def start(self) -> None:
        if self.engine is not None:
            self.engine.start()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # ------------------------------------------------------------------ keys and models
    def grant_of(self, request: Request) -> Grant | None:
        """The caller's grant (None when the server has no keys); 401 without a valid key."""
        if self.api_keys is None:
            return None
        grant = find_grant(self.api_keys, request.headers.get("authorization"))
        if grant is None:
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        return grant

    def require_admin(self, request: Request, verb: str) -> None:
        grant = self.grant_of(request)
        if grant is not None and not grant.admin:
            raise APIError(403, f"only a '*' API key may {verb} adapters", code="forbidden")

    def visible_models(self, grant: Grant | None) -> list[str]:
        """The base, then the adapters, that `grant` may use."""
        names = [self.base_name, *sorted(self.registry.known())]
        return [name for name in names if grant is None or grant.allows(name)]

    def health(self, request: Request) -> dict[str, Any]:
        alive = self.engine is None or self.engine.alive
        answer: dict[str, Any] = {"status": "ok" if alive else "engine stopped", "model": self.base_name}
        try:  # probes come without a key: they learn the server is up, not which adapters it holds
            grant = self.grant_of(request)
        except APIError:
            return answer
        answer["adapters"] = [n for n in sorted(self.registry.known()) if grant is None or grant.allows(n)]
        return answer

    def adapter_for(self, grant: Grant | None, model: str) -> str | None:
        """The registry name for `model` (None for the base), after the key check."""
        # The grant first: a key must not learn which adapters it may not use exist (403 either way).
        if grant is not None and not grant.allows(model):
            raise APIError(403, f"this API key may not use model {model!r}", param="model", code="forbidden")
        if model != self.base_name and model not in self.registry.known():
            raise APIError(404, f"model {model!r} does not exist; GET /v1/models lists them", param="model",
                           code="model_not_found")  # fmt: skip
        return None if model == self.base_name else model

    async def parse(self, request: Request, schema: type[BaseModel]) -> Any:
        """The request's body as a `schema`, within the body limit."""
        return validate(schema, parse_json(await read_body(request, self.max_body)))

    # ------------------------------------------------------------------ generation
    def require_engine(self) -> Engine:
        if self.engine is None:
            raise APIError(400, CLASSIFIER_ONLY, code="unsupported")
        return self.engine

    def chat_prompt(self, grant: Grant | None, body: Any) -> str | list[int]:
        """The chat template applied to the messages, after the key check (the template runs client input)."""
        engine = self.require_engine()
        adapter = self.adapter_for(grant, body.model)
        try:
            template = self.registry.info(adapter).template if adapter is not None else None
            return engine.chat_prompt([m.model_dump() for m in body.messages], template)
        except Exception as err:  # a template may refuse roles or orders (jinja raises its own errors)
            raise APIError(400, f"the messages do not fit the chat template: {err}", param="messages") from None

    async def submit(self, grant: Grant | None, body: GenerationBody, prompt: Any) -> GenerationRequest:
        engine = self.require_engine()
        adapter = self.adapter_for(grant, body.model)
        params = sampling_params(body, self.default_max_tokens)
        try:  # pinning may read the adapter from disk: off the event loop
            return await run_in_threadpool(engine.submit, prompt, adapter, params, loop=asyncio.get_running_loop())
        except RequestError as err:
            raise APIError(err.status, str(err), param=err.param, code=err.code) from None
        except NoFreeSlotError as err:  # every slot pinned by running requests: the client may retry
            raise APIError(429, str(err), type="rate_limit_error", param="model", code="no_free_slot") from None
        except LorakitError as err:  # the registry refused the adapter (removed meanwhile, bad files)
            raise APIError(400, str(err), param="model") from None

    async def submit_all(self, grant: Grant | None, body: GenerationBody, prompts: list[Any]) -> list[Any]:
        jobs: list[Any] = []
        try:
            for prompt in prompts:
                jobs.append(await self.submit(grant, body, prompt))
        except BaseException:  # a later prompt was refused: the earlier ones must not run for nobody
            for job in jobs:
                job.cancel()
            raise
        return jobs

    @staticmethod
    async def finish(jobs: list[Any]) -> list[Any]:
        """Wait for every job; their Completions (a 500 if one failed)."""
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

    # ------------------------------------------------------------------ classification
    def require_classifier(self) -> None:
        if not self.classifier:
            raise APIError(400, "this base model is a causal LM: use /v1/completions", code="unsupported")

    async def classify(self, adapter: str | None, texts: list[str]) -> torch.Tensor:
        """Class probabilities [texts, labels] under `adapter`, computed off the event loop."""
        try:
            return await run_in_threadpool(self._class_probabilities, adapter, texts)
        except LorakitError as err:
            raise APIError(400, str(err), param="model") from None

    def _class_probabilities(self, adapter: str | None, texts: list[str]) -> torch.Tensor:
        multi = self.multi
        limit = input_limit(multi.model, self.tokenizer)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=min(limit, 4096), return_tensors="pt")
        device = next(multi.model.parameters()).device
        if self.registry is not None:
            self.registry.pin(adapter)
        try:
            with self._forward_lock, torch.no_grad(), multi.use([adapter] * len(texts)):
                return multi.model(**batch.to(device)).logits.float().softmax(-1).cpu()
        finally:
            if self.registry is not None:
                self.registry.unpin(adapter)

    def label_names(self, adapter: str | None = None, count: int | None = None) -> dict | None:
        """Output index -> label name under `adapter`: the names its card gives (when it gives
        `count` of them: the adapter's own head), else the base config's id2label."""
        labels = None
        if adapter is not None and self.registry is not None:
            try:
                labels = self.registry.info(adapter).labels
            except LorakitError:  # removed since its forward ran: the answer stands, named by the base
                log.info("adapter %r left before its labels were read", adapter)
        if labels and (count is None or len(labels) == count):
            return dict(enumerate(labels))
        return getattr(self.multi.model.config, "id2label", None)

    # ------------------------------------------------------------------ adapters
    async def load_adapter(self, name: str, given_path: str) -> None:
        """Register the folder `given_path` (under the adapter root) as `name`."""
        if self.root is None:
            raise APIError(
                403, "this server was started without --adapter-root: adapters cannot be loaded", param="path"
            )
        path = adapter_folder(self.root, given_path)
        if name == self.base_name:
            raise APIError(409, f"{name!r} is the base model's name: pick another", param="name")
        try:
            await run_in_threadpool(self.registry.register, name, path)
        except (LorakitError, OSError) as err:  # OSError: the folder changed or is unreadable under us
            raise APIError(400, str(err), param="path", code="invalid_adapter") from None

    async def remove_adapter(self, name: str) -> None:
        if name not in self.registry.known():
            raise APIError(404, f"adapter {name!r} is not loaded", param="name", code="model_not_found")
        try:
            await run_in_threadpool(self.registry.remove, name)
        except LorakitError as err:
            raise APIError(409, str(err), param="name") from None

    # ------------------------------------------------------------------ vLLM's adapter API
    async def load_lora_adapter(self, name: str, given_path: str, load_inplace: bool) -> str:
        """vLLM's POST /v1/load_lora_adapter: load_adapter's checks, plus 400 for a known name
        unless `load_inplace` (then the new folder replaces it, as POST /v1/adapters does)."""
        with vllm_params():
            if not load_inplace and name in self.registry.known():
                raise APIError(400, f"The lora adapter '{name}' has already been loaded. If you want to load "
                               "the adapter in place, set 'load_inplace' to True.", param="lora_name")  # fmt: skip
            await self.load_adapter(name, given_path)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_lora_adapter(self, name: str) -> str:
        """vLLM's POST /v1/unload_lora_adapter: remove_adapter with vLLM's messages."""
        with vllm_params():
            if name not in self.registry.known():
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
            await self.remove_adapter(name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def model_roots(self) -> dict[str, str]:
        """Each adapter's `root` on GET /v1/models (vLLM shows its lora_path): the folder relative
        to --adapter-root, as a client names it in lora_path; an adapter outside the root (the
        operator's own, from --adapter) shows its name, so the server's own folders never leak."""
        roots = {}
        for name in self.registry.known():
            try:
                folder = self.registry.path_of(name)
            except LorakitError:  # removed meanwhile: the listing shows its name
                continue
            if self.root is not None and folder.is_relative_to(self.root):
                roots[name] = folder.relative_to(self.root).as_posix()
        return roots


VLLM_PARAMS = {"name": "lora_name", "path": "lora_path"}


# vLLM's serving_models.py answers its adapter routes with these error types and the HTTP status as the code.
VLLM_ERROR_TYPES = {400: "InvalidUserInput", 404: "NotFoundError"}


@contextlib.contextmanager
def vllm_params() -> Iterator[None]:
    """Errors of vLLM's adapter routes in vLLM's terms: its field names (lora_name, lora_path), its error
    types (InvalidUserInput, NotFoundError, else BadRequestError) and the status as the code, as vLLM sends."""
    try:
        yield
    except APIError as err:
        err.param = VLLM_PARAMS.get(err.param, err.param)
        if err.status not in (401, 403):  # lorakit's own gates keep their types (vLLM has no such gate)
            err.type = VLLM_ERROR_TYPES.get(err.status, "BadRequestError")
            err.code = err.status
        raise


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
