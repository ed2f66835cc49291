"""What every route shares: the server's state, who the caller is (API keys bound to
tenants), and the tokenizer thread."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry
from vllm.tool_parsers import ToolParser
from vllm.v1.engine.async_llm import AsyncLLM

from server.augmentation import Augmenter
from server.errors import ApiError
from server.metrics import ServerMetrics
from server.prompts import Tokenizer

ANY_TENANT = "*"
"""An API key bound to this may name any tenant in its requests (an operator's key)."""

T = TypeVar("T")


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
    aliases: tuple[str, ...] = ()
    """Further names the model answers to (vLLM's --served-model-name takes several)."""
    chat_template: str | None = None
    """The chat template to render with (vLLM's --chat-template); None: the tokenizer's."""
    vocab_size: int | None = None
    """Token ids in prompts must be below this (None: not checked here)."""
    default_sampling: Mapping[str, Any] = field(default_factory=dict)
    """Sampling defaults from the model's generation_config (vLLM's
    `model_config.get_diff_sampling_param()`), used where a request sets none."""
    tool_parser: type[ToolParser] | None = None
    """vLLM's tool-call parser for `tool_choice: "auto"` (vLLM's --enable-auto-tool-choice
    --tool-call-parser); None: "auto" is refused."""
    engine_registry: CollectorRegistry | None = None
    """Where vLLM's stat logger registers its `vllm:` series (prometheus_client's default
    registry, or a multiprocess one); rendered on /metrics beside ours."""
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="tokenize")
    )
    """Tokenization and chat templating run here, off the event loop. One thread: a fast
    tokenizer is not safe to call from several threads at once."""

    def served_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.aliases)


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


def server_state(request: Request) -> ServerState:
    return request.app.state.deliberate  # type: ignore[no-any-return]


def bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def match_key(token: str | None, keys: Mapping[str, str]) -> str | None:
    """The tenant of the key equal to `token`, compared in constant time: every key is
    compared, and each comparison takes as long whatever the first differing byte."""
    found = None
    given = (token or "").encode()
    for key, tenant in keys.items():
        if hmac.compare_digest(given, key.encode()) and token is not None:
            found = tenant
    return found


def invalid_key() -> ApiError:
    return ApiError(
        401,
        "missing or invalid API key: send 'Authorization: Bearer <key>'",
        type="authentication_error",
        code="invalid_api_key",
    )


def authorized(request: Request, state: ServerState = Depends(server_state)) -> Caller:  # noqa: B008
    default = state.augmenter.default_tenant
    if not state.api_keys:
        return Caller(default, any_tenant=True)
    tenant = match_key(bearer(request), state.api_keys)
    if tenant is None:
        raise invalid_key()
    if tenant == ANY_TENANT:
        return Caller(default, any_tenant=True)
    return Caller(tenant, any_tenant=False)


async def off_loop(state: ServerState, fn: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(state.tokenizer_pool, functools.partial(fn, *args))
