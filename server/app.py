"""The HTTP layer: OpenAI-compatible routes over vLLM, plus augmentation pre-warm and status.

The app is built by `create_app(state)` from an already started engine and store, so tests and
the CLI wire it the same way; nothing here reads settings from the environment.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

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
    api_keys: frozenset[str]
    metrics: ServerMetrics
    registry: CollectorRegistry
    created: int


def _state(request: Request) -> ServerState:
    return request.app.state.deliberate  # type: ignore[no-any-return]


def _authorized(request: Request, state: ServerState = Depends(_state)) -> None:  # noqa: B008
    if not state.api_keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token not in state.api_keys:
        raise ApiError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="invalid_api_key",
        )


class BodySizeLimit:
    """Refuse bodies over a byte limit before they are read whole (chunked uploads too)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            ApiError(
                413, f"request body over {self.max_bytes} bytes", code="request_too_large"
            ).body
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


def create_app(state: ServerState, *, max_request_bytes: int) -> FastAPI:
    app = FastAPI(title="Deliberate", version="0.1.0")
    app.state.deliberate = state
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
        # whose whole answer is the store's.
        body = ApiError(503, f"augmentation store unavailable: {exc}", type="server_error").body
        return JSONResponse(body, status_code=503)

    auth = [Depends(_authorized)]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        try:
            await state.engine.check_health()
        except Exception as exc:  # any engine failure means: do not route traffic here
            return JSONResponse({"status": "engine unavailable", "error": str(exc)}, 503)
        return JSONResponse({"status": "ready", "model": state.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
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

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest) -> Response:
        _check_model(state, body)
        try:
            prompt_text = body.prompt_text()
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from exc
        parts = split_completion(state.tokenizer, body.context, prompt_text)
        return await _serve(state, body, parts, chat=False, default_max_tokens=16)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        _check_model(state, body)
        try:
            parts = split_chat(state.tokenizer, body.messages, body.context_messages)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        return await _serve(
            state, body, parts, chat=True, default_max_tokens=body.max_completion_tokens
        )

    @app.post("/v1/augmentations", dependencies=auth)
    async def prewarm(body: AugmentationRequest) -> dict[str, Any]:
        results = []
        for item in body.items():
            # The same tokens as a completion's `context`, so the keys match later requests.
            context_ids = state.tokenizer.encode(item.context)
            _check_context_length(state, context_ids)
            job, outcome = await state.augmenter.prewarm(context_ids, item.tenant or body.tenant)
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

    @app.get("/v1/augmentations/{key}", dependencies=auth)
    async def augmentation_status(key: str) -> dict[str, Any]:
        try:
            validate_key(key)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="key") from exc
        status = await state.augmenter.status(key)
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
    *,
    chat: bool,
    default_max_tokens: int | None,
) -> Response:
    arrived = time.perf_counter()
    _check_context_length(state, parts.context_ids)
    plan = await state.augmenter.plan(
        parts.context_ids,
        parts.rest_ids,
        tenant=body.tenant,
        augment=body.augment,
        wait_s=body.augment_wait_seconds,
    )
    prompt_len = plan.prompt_tokens + plan.n_latents
    room = state.max_model_len - prompt_len
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
    outputs = _timed(state, plan, arrived, state.engine.generate(plan.prompt, params, request_id))
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
