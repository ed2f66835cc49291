"""The HTTP layer: OpenAI-compatible routes over vLLM, plus augmentation pre-warm and status.

The app is built by `create_app(state)` from an already started engine and store, so tests and
the CLI wire it the same way; nothing here reads settings from the environment.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sse_starlette import EventSourceResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from vllm import SamplingParams
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from cache_store.errors import StoreError
from cache_store.keys import validate_key
from cache_store.types import KeyState
from cache_store.value import ValueFigure
from server.augmentation import Augmenter, Plan
from server.metrics import ServerMetrics
from server.prompts import PromptParts, Tokenizer, split_chat, split_completion
from server.protocol import (
    AugmentationRequest,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
)

STATUS_HEADER = "X-Deliberate-Augmentation"
KEY_HEADER = "X-Deliberate-Key"
ANY_TENANT = "*"
"""An API key bound to this may name any tenant in its requests (an operator's key)."""

log = logging.getLogger(__name__)
T = TypeVar("T")


class ApiError(Exception):
    """An error the client caused, answered in OpenAI's error format."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ServerState:
    engine: AsyncLLM
    tokenizer: Tokenizer
    augmenter: Augmenter
    model_name: str
    max_model_len: int
    max_context_tokens: int
    api_keys: Mapping[str, str]
    """API key -> the tenant it acts for (ANY_TENANT: any). Empty: no authentication, and
    every request acts for the default tenant unless it names another."""
    metrics: ServerMetrics
    registry: CollectorRegistry
    created: int
    metrics_key: str | None = None
    """A bearer token that may read /metrics only (Prometheus' scrape token)."""
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="tokenize")
    )
    """Tokenization and chat templating run here, off the event loop. One thread: a fast
    tokenizer is not safe to call from several threads at once."""


@dataclass(frozen=True)
class Caller:
    """Who a request acts for: the tenant its API key is bound to."""

    tenant: str
    any_tenant: bool

    def tenant_for(self, requested: str | None) -> str:
        """The tenant a request acts for; a key may name only its own tenant unless it is
        bound to ANY_TENANT."""
        if requested is None or requested == self.tenant or self.any_tenant:
            return requested or self.tenant
        raise ApiError(
            403,
            f"this API key may not act for tenant '{requested}'; omit 'tenant' to use the "
            "key's own",
            type="permission_error",
            param="tenant",
            code="tenant_not_allowed",
        )

    def may_see(self, tenant: str | None) -> bool:
        return self.any_tenant or (tenant is not None and tenant == self.tenant)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cache_salt(tenant: str) -> str:
    """vLLM's prefix-cache salt for a tenant: requests of different tenants never share KV
    blocks, so one cannot learn from time to first token what another sent."""
    return hashlib.sha256(b"deliberate-tenant\0" + tenant.encode()).hexdigest()[:32]


def _state(request: Request) -> ServerState:
    return request.app.state.deliberate  # type: ignore[no-any-return]


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def _match_key(token: str | None, keys: Mapping[str, str]) -> str | None:
    """The tenant of the key equal to `token`, compared in constant time: every key is
    compared, and each comparison takes as long whatever the first differing byte."""
    found = None
    given = (token or "").encode()
    for key, tenant in keys.items():
        if hmac.compare_digest(given, key.encode()) and token is not None:
            found = tenant
    return found


def _invalid_key() -> ApiError:
    return ApiError(
        401,
        "missing or invalid API key: send 'Authorization: Bearer <key>'",
        type="authentication_error",
        code="invalid_api_key",
    )


def _authorized(request: Request, state: ServerState = Depends(_state)) -> Caller:  # noqa: B008
    default = state.augmenter.default_tenant
    if not state.api_keys:
        return Caller(default, any_tenant=True)
    tenant = _match_key(_bearer(request), state.api_keys)
    if tenant is None:
        raise _invalid_key()
    if tenant == ANY_TENANT:
        return Caller(default, any_tenant=True)
    return Caller(tenant, any_tenant=False)


async def _off_loop(state: ServerState, fn: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(state.tokenizer_pool, functools.partial(fn, *args))


class BodySizeLimit:
    """Refuse bodies over a byte limit with a 413, before the app sees them.

    The body is read here (at most max_bytes of it) and handed to the app whole: counting
    inside the app's receive instead made an oversized chunked upload a 400, since the
    framework turns any error while reading the body into "error parsing the body"."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        try:
            too_large = declared is not None and int(declared) > self.max_bytes
        except ValueError:
            too_large = False  # the server rejects a malformed Content-Length itself
        if too_large:
            await _send_error(send, 413, f"request body over {self.max_bytes} bytes")
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending the whole body
            body = message.get("body", b"")
            received += len(body)
            if received > self.max_bytes:
                await _send_error(send, 413, f"request body over {self.max_bytes} bytes")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # what follows the body: the disconnect, if any

        await self.app(scope, replay, send)


class ConcurrencyLimit:
    """At most `limit` generation and pre-warm requests at once (streams count until their
    last chunk); more are answered 503 at once instead of queueing without bound."""

    PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/augmentations")

    def __init__(self, app: ASGIApp, limit: int, on_refused: Callable[[], None]) -> None:
        self.app = app
        self.limit = limit
        self.on_refused = on_refused
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.limit <= 0
            or scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in self.PATHS
        ):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.on_refused()
            await _send_error(
                send,
                503,
                f"server overloaded: {self.limit} requests in progress; retry shortly",
                type="server_error",
                code="overloaded",
                headers=[(b"retry-after", b"1")],
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _send_error(
    send: Send,
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    code = code or ("request_too_large" if status == 413 else None)
    body = json.dumps(ApiError(status, message, type=type, code=code).body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    state: ServerState,
    *,
    max_request_bytes: int,
    max_concurrent_requests: int = 0,
    docs: bool = False,
) -> FastAPI:
    """The app. `max_concurrent_requests` (0: no limit) bounds generation and pre-warm
    requests in progress; `docs` serves /docs, /redoc and /openapi.json (off by default:
    they describe the API to anyone who can reach the port)."""
    app = FastAPI(
        title="Deliberate",
        version="0.1.0",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.deliberate = state
    app.add_middleware(
        ConcurrencyLimit,
        limit=max_concurrent_requests,
        on_refused=lambda: state.metrics.rejected.labels(code="503").inc(),
    )
    # Added last, so it runs first: an oversized body never takes a concurrency slot.
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        state.metrics.rejected.labels(code=str(exc.status_code)).inc()
        return JSONResponse(exc.body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return await _api_error(request, ApiError(400, message, param=where or None))

    @app.exception_handler(StoreError)
    async def _store_down(request: Request, exc: StoreError) -> JSONResponse:
        # Generation never gets here (it degrades to plain); only the augmentation endpoints,
        # whose whole answer is the store's. The cause goes to the log, not to the client.
        log.warning("augmentation store unavailable for %s: %s", request.url.path, exc)
        body = ApiError(
            503,
            "augmentation store unavailable; retry later",
            type="server_error",
            code="store_unavailable",
        ).body
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    auth = Depends(_authorized)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        try:
            await state.engine.check_health()
        except Exception as exc:  # any engine failure means: do not route traffic here
            log.warning("not ready: engine health check failed: %r", exc)
            return JSONResponse({"status": "engine unavailable"}, 503)
        return JSONResponse({"status": "ready", "model": state.model_name})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        # Behind the API keys (any of them, or the scrape-only metrics key) when keys are
        # configured: the metrics name tenants' traffic and the store's health.
        if state.api_keys or state.metrics_key:
            token = _bearer(request)
            scrape = {state.metrics_key: "metrics"} if state.metrics_key else {}
            if _match_key(token, {**state.api_keys, **scrape}) is None:
                raise _invalid_key()
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "deliberate",
                    "max_model_len": state.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, caller: Caller = auth) -> Response:
        _check_model(state, body)
        tenant = caller.tenant_for(body.tenant)
        try:
            prompt_text = body.prompt_text()
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from exc
        parts = await _off_loop(state, split_completion, state.tokenizer, body.context, prompt_text)
        return await _serve(state, body, parts, tenant, chat=False, default_max_tokens=16)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, caller: Caller = auth) -> Response:
        _check_model(state, body)
        tenant = caller.tenant_for(body.tenant)
        try:
            parts = await _off_loop(
                state, split_chat, state.tokenizer, body.messages, body.context_messages
            )
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        return await _serve(
            state, body, parts, tenant, chat=True, default_max_tokens=body.max_completion_tokens
        )

    @app.post("/v1/augmentations")
    async def prewarm(body: AugmentationRequest, caller: Caller = auth) -> dict[str, Any]:
        items = [(item, caller.tenant_for(item.tenant or body.tenant)) for item in body.items()]
        results = []
        for item, tenant in items:
            # The same tokens as a completion's `context`, so the keys match later requests.
            context_ids = await _off_loop(state, state.tokenizer.encode, item.context)
            _check_context_length(state, context_ids)
            job, outcome = await state.augmenter.prewarm(context_ids, tenant)
            status = await state.augmenter.status(job.key)
            results.append(
                {
                    "key": job.key,
                    "outcome": outcome,
                    "state": status.state.value,
                    "context_tokens": len(context_ids),
                }
            )
        return {"object": "list", "data": results}

    @app.get("/v1/augmentations/{key}")
    async def augmentation_status(key: str, caller: Caller = auth) -> dict[str, Any]:
        try:
            validate_key(key)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="key") from exc
        status = await state.augmenter.status(key)
        # A key of another tenant is answered exactly like one that does not exist, so the
        # answer cannot tell whether another tenant sent that context.
        if status.state is KeyState.ABSENT or not caller.may_see(status.tenant):
            raise ApiError(
                404,
                f"no augmentation with key {key} for this API key's tenant",
                param="key",
                code="augmentation_not_found",
            )
        return {
            "key": key,
            "state": status.state.value,
            "reason": status.reason,
            "attempts": status.attempts,
            "value": _value_body(status.value),
        }

    return app


def _value_body(figure: ValueFigure | None) -> dict[str, Any] | None:
    """The value check's figure of a key's latents, as the worker measured it."""
    if figure is None:
        return None
    return {
        "perplexity_change": figure.relative_change,
        "delta_nats": figure.delta,
        "std_error_nats": figure.std_error,
        "tokens": figure.tokens,
    }


def _check_model(state: ServerState, body: GenerationRequest) -> None:
    if body.model != state.model_name:
        raise ApiError(
            404,
            f"model '{body.model}' is not served here; GET /v1/models lists '{state.model_name}'",
            param="model",
            code="model_not_found",
        )


def _check_context_length(state: ServerState, context_ids: list[int]) -> None:
    if len(context_ids) > state.max_context_tokens:
        raise ApiError(
            400,
            f"context is {len(context_ids)} tokens; this server accepts at most "
            f"{state.max_context_tokens}",
            param="context",
            code="context_too_long",
        )


def _sampling_params(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int, stream: bool
) -> SamplingParams:
    if isinstance(body, ChatCompletionRequest):
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    return SamplingParams(
        n=body.n,
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=max_tokens,
        stop=body.stop,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


async def _serve(
    state: ServerState,
    body: CompletionRequest | ChatCompletionRequest,
    parts: PromptParts,
    tenant: str,
    *,
    chat: bool,
    default_max_tokens: int | None,
) -> Response:
    arrived = time.perf_counter()
    _check_context_length(state, parts.context_ids)
    plan = await state.augmenter.plan(
        parts.context_ids,
        parts.rest_ids,
        tenant=tenant,
        augment=body.augment,
        wait_s=body.augment_wait_seconds,
    )
    prompt_len = plan.prompt_tokens + plan.n_latents
    room = state.max_model_len - prompt_len
    if room < 1:
        raise ApiError(
            400,
            f"prompt ({prompt_len} positions) leaves no room to generate within the "
            f"model's context of {state.max_model_len}",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    max_tokens = body.max_tokens or default_max_tokens or room
    if max_tokens > room:
        raise ApiError(
            400,
            f"prompt ({prompt_len} positions) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {state.max_model_len}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    endpoint = "chat" if chat else "completions"
    state.metrics.requests.labels(endpoint=endpoint, status=plan.status.value).inc()
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    params = _sampling_params(body, max_tokens, body.stream)
    headers = {STATUS_HEADER: plan.status.value}
    if plan.key:
        headers[KEY_HEADER] = plan.key
    # Per-tenant salt on every prompt (tokens or embeddings): vLLM's prefix cache is shared
    # by all requests, and a cache hit shows in the time to first token.
    prompt = {**plan.prompt, "cache_salt": cache_salt(tenant)}
    outputs = _timed(state, plan, arrived, state.engine.generate(prompt, params, request_id))
    render = _ChatRenderer if chat else _CompletionRenderer
    renderer = render(request_id, state.model_name, plan, state.tokenizer)
    if body.stream:
        return EventSourceResponse(renderer.stream(outputs), headers=headers)
    final: RequestOutput | None = None
    async for output in outputs:
        final = output
    assert final is not None, "vLLM finished a request without output"
    return JSONResponse(renderer.whole(final), headers=headers)


async def _timed(
    state: ServerState, plan: Plan, arrived: float, outputs: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    status = plan.status.value
    first = True
    async for output in outputs:
        if first:
            state.metrics.time_to_first_token.labels(status=status).observe(
                time.perf_counter() - arrived
            )
            first = False
        yield output
    state.metrics.request_duration.labels(status=status).observe(time.perf_counter() - arrived)


class _Renderer:
    """Turns vLLM outputs into OpenAI response bodies and stream chunks."""

    object_whole: str
    object_chunk: str

    def __init__(self, request_id: str, model: str, plan: Plan, tokenizer: Tokenizer) -> None:
        self.request_id = request_id
        self.model = model
        self.plan = plan
        self.tokenizer = tokenizer
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, output: RequestOutput) -> dict[str, Any]:
        choices = [self.choice(c.index, c, final=True) for c in output.outputs]
        completion_tokens = sum(len(c.token_ids) for c in output.outputs)
        return {
            **self._envelope(self.object_whole),
            "choices": choices,
            "usage": {
                "prompt_tokens": self.plan.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": self.plan.prompt_tokens + completion_tokens,
            },
            "augmentation": self.plan.describe(),
        }

    async def stream(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[dict[str, str]]:
        first = True
        async for output in outputs:
            for completion in output.outputs:
                chunk = {
                    **self._envelope(self.object_chunk),
                    "choices": [self.choice(completion.index, completion, final=False)],
                }
                if first:
                    chunk["augmentation"] = self.plan.describe()
                    first = False
                yield {"data": json.dumps(chunk)}
        yield {"data": "[DONE]"}

    def choice(self, index: int, completion: Any, *, final: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _token_text(self, token_id: int, logprob: Any) -> str:
        text = getattr(logprob, "decoded_token", None)
        return text if text is not None else self.tokenizer.decode([token_id])


class _CompletionRenderer(_Renderer):
    object_whole = "text_completion"
    object_chunk = "text_completion"

    def choice(self, index: int, completion: Any, *, final: bool) -> dict[str, Any]:
        return {
            "index": index,
            "text": completion.text,
            "logprobs": self._logprobs(completion),
            "finish_reason": completion.finish_reason,
        }

    def _logprobs(self, completion: Any) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None
        tokens, token_logprobs, top = [], [], []
        for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=True):
            chosen = candidates[token_id]
            tokens.append(self._token_text(token_id, chosen))
            token_logprobs.append(chosen.logprob)
            top.append({self._token_text(t, lp): lp.logprob for t, lp in candidates.items()})
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": [],
        }


class _ChatRenderer(_Renderer):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def choice(self, index: int, completion: Any, *, final: bool) -> dict[str, Any]:
        message = {"role": "assistant", "content": completion.text}
        return {
            "index": index,
            ("message" if final else "delta"): message,
            "logprobs": self._logprobs(completion),
            "finish_reason": completion.finish_reason,
        }

    def _logprobs(self, completion: Any) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None
        content = []
        for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=True):
            chosen = candidates[token_id]
            content.append(
                {
                    "token": self._token_text(token_id, chosen),
                    "logprob": chosen.logprob,
                    "bytes": None,
                    "top_logprobs": [
                        {"token": self._token_text(t, lp), "logprob": lp.logprob, "bytes": None}
                        for t, lp in sorted(candidates.items(), key=lambda c: c[1].rank)
                    ],
                }
            )
        return {"content": content}
