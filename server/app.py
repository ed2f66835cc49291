"""The HTTP app: wires routes to the serving modules, plus auth, limits and error shapes.

The app is built by `create_app(state)` from an already started engine and store, so tests and
the CLI wire it the same way; nothing here reads settings from the environment. The serving
logic lives in one module per endpoint (`serving_completions`, `serving_chat`,
`serving_augmentations`), the request models in `protocol`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import vllm
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator

from cache_store.errors import StoreError
from server import (
    serving_augmentations,
    serving_chat,
    serving_completions,
    serving_tokenization,
)
from server.errors import ApiError
from server.generation import KEY_HEADER, STATUS_HEADER, unless_disconnected
from server.middleware import BodySizeLimit, ConcurrencyLimit
from server.protocol import (
    AugmentationRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from server.state import (
    ANY_TENANT,
    Caller,
    ServerState,
    authorized,
    bearer,
    cache_salt,
    invalid_key,
    is_loopback,
    match_key,
)

__all__ = [
    "ANY_TENANT",
    "KEY_HEADER",
    "STATUS_HEADER",
    "ApiError",
    "ServerState",
    "cache_salt",
    "create_app",
    "is_loopback",
]

log = logging.getLogger(__name__)


def create_app(
    state: ServerState,
    *,
    max_request_bytes: int,
    max_concurrent_requests: int = 0,
    docs: bool = False,
    http_metrics: bool = True,
) -> FastAPI:
    """The app. `max_concurrent_requests` (0: no limit) bounds generation and pre-warm
    requests in progress; `docs` serves /docs, /redoc and /openapi.json (off by default:
    they describe the API to anyone who can reach the port); `http_metrics` adds vLLM's
    HTTP metrics (prometheus-fastapi-instrumentator) to the state's registry."""
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
    # Added after the concurrency limit, so it runs first: an oversized body never takes a
    # concurrency slot.
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    if http_metrics:
        # vLLM's HTTP metrics (http_requests_total, http_request_duration_seconds, ...), on
        # the outside, so that refusals by the limits above are counted too.
        Instrumentator(
            excluded_handlers=["/metrics", "/health", "/ready", "/version"],
            registry=state.registry,
        ).instrument(app)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        state.metrics.rejected.labels(code=str(exc.status_code)).inc()
        return JSONResponse(exc.body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return await _api_error(request, ApiError(400, message, param=param))

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

    auth = Depends(authorized)

    @app.get("/health")
    async def health() -> JSONResponse:
        # As vLLM's: fails when the engine is dead, so the liveness probe restarts the pod.
        try:
            await state.engine.check_health()
        except Exception as exc:
            log.error("engine health check failed: %r", exc)
            return JSONResponse({"status": "engine dead"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": vllm.__version__, "deliberate_version": app.version}

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
            token = bearer(request)
            scrape = {state.metrics_key: "metrics"} if state.metrics_key else {}
            if match_key(token, {**state.api_keys, **scrape}) is None:
                raise invalid_key()
        text = generate_latest(state.registry)
        if state.engine_registry is not None and state.engine_registry is not state.registry:
            text += generate_latest(state.engine_registry)  # vLLM's own `vllm:` series
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "deliberate",
                    "root": state.model_name,
                    "max_model_len": state.max_model_len,
                }
                for name in state.served_names()
            ],
        }

    @app.post("/tokenize", dependencies=[auth])
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await serving_tokenization.tokenize(state, body)

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return await serving_tokenization.detokenize(state, body)

    def disconnected(endpoint: str) -> Callable[[], None]:
        return state.metrics.disconnected.labels(endpoint=endpoint).inc

    @app.post("/v1/completions")
    async def completions(
        request: Request, body: CompletionRequest, caller: Caller = auth
    ) -> Response:
        return await unless_disconnected(
            request,
            serving_completions.create_completion(state, body, caller),
            disconnected("completions"),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(
        request: Request, body: ChatCompletionRequest, caller: Caller = auth
    ) -> Response:
        return await unless_disconnected(
            request,
            serving_chat.create_chat_completion(state, body, caller),
            disconnected("chat"),
        )

    @app.post("/v1/augmentations")
    async def prewarm(body: AugmentationRequest, caller: Caller = auth) -> dict[str, Any]:
        return await serving_augmentations.prewarm(state, body, caller)

    @app.get("/v1/augmentations/{key}")
    async def augmentation_status(key: str, caller: Caller = auth) -> dict[str, Any]:
        return await serving_augmentations.augmentation_status(state, key, caller)

    return app


_PARAM_IN_MESSAGE = re.compile(r"^'?([a-z_]+)'?[: ]")


def validation_message(errors: Any) -> tuple[str, str | None]:
    """The first validation error as a message and the parameter it names. An unknown field
    is refused by name: nothing a client sends is silently ignored."""
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    if first["type"] == "extra_forbidden":
        return (
            f"unsupported parameter '{where}': this server does not accept it "
            "(docs/vllm-parity.md lists what it takes)",
            where,
        )
    msg = first["msg"].removeprefix("Value error, ")
    if where:
        return f"{where}: {msg}", where
    named = _PARAM_IN_MESSAGE.match(msg)
    return msg, named.group(1) if named else None
