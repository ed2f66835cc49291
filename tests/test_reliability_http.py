"""The HTTP layer's guards over real HTTP (uvicorn on loopback) with a real redis-server
and the bundled tokenizer: store failures answered 503 in the OpenAI shape, keys bound to
tenants, scoped status lookups, /metrics behind the keys, docs off, body and concurrency
limits, tokenization off the event loop. Routes that generate are in
test_reliability_server.py (real vLLM)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from cache_store import open_store
from deliberate.serving import warn_if_open
from deliberate.settings import Settings
from server import state as app_module
from tests.fixtures.app_server import DecoderParts, make_state, serving
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.store_backends import FAST
from tests.test_reliability_store import FAULTS, _server

ServerFactory = Callable[..., RedisServer]
CONTEXT = (
    "The Kestrel Valley railway opened in 1887 to carry slate from the quarries at Penrhos "
    "down to the harbour at Aberkell. For forty years it ran three trains a day."
)
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b", "key-ops": "*"}


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _is_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.fixture
async def redis_app(
    redis_server_factory: ServerFactory, decoder_parts: DecoderParts
) -> AsyncIterator[tuple[str, RedisServer]]:
    server = redis_server_factory()
    store = open_store(server.url, registry=CollectorRegistry(), **FAST)
    async with serving(make_state(decoder_parts, store, api_keys=KEYS)) as base:
        yield base, server
    await store.close()


# --- item 5: store failures on the augmentation endpoints ---------------------------------


@pytest.mark.parametrize("code", list(FAULTS))
async def test_store_error_replies_answer_503_in_the_openai_shape(
    redis_server_factory: ServerFactory, decoder_parts: DecoderParts, code: str
) -> None:
    server = _server(redis_server_factory)
    with FAULTS[code](server) as url:
        store = open_store(url, registry=CollectorRegistry(), **FAST)
        try:
            async with (
                serving(make_state(decoder_parts, store)) as base,
                httpx.AsyncClient(base_url=base, timeout=30) as http,
            ):
                prewarm = await http.post("/v1/augmentations", json={"context": CONTEXT})
                error = _is_openai_error(prewarm, 503)
                assert error["code"] == "store_unavailable"
                assert code not in error["message"]  # the cause goes to the log only
                assert prewarm.headers["retry-after"] == "1"
                if code in ("BUSY", "NOPERM"):  # reads are refused too
                    status = await http.get(f"/v1/augmentations/{'a' * 64}")
                    _is_openai_error(status, 503)
        finally:
            await store.close()


async def test_a_hung_store_answers_503_and_the_breaker_skips_it(
    redis_server_factory: ServerFactory, decoder_parts: DecoderParts
) -> None:
    server = redis_server_factory()
    options = FAST | {"op_timeout_s": 0.3, "breaker_failures": 3, "breaker_cooldown_s": 30.0}
    store = open_store(server.url, registry=CollectorRegistry(), **options)
    try:
        async with (
            serving(make_state(decoder_parts, store)) as base,
            httpx.AsyncClient(base_url=base, timeout=30) as http,
        ):
            assert (await http.get(f"/v1/augmentations/{'b' * 64}")).status_code == 404
            server.pause()
            try:
                for _ in range(6):
                    response = await http.get(f"/v1/augmentations/{'b' * 64}")
                    _is_openai_error(response, 503)
            finally:
                server.resume()
            metrics = (await http.get("/metrics")).text
        assert 'deliberate_store_breaker_skipped_total{op="status"} 3.0' in metrics
        assert "deliberate_store_breaker_opened_total 1.0" in metrics
    finally:
        await store.close()


# --- item 1: tenants bound to keys ---------------------------------------------------------


async def test_keys_act_for_their_tenant_only_and_status_is_scoped(
    redis_app: tuple[str, RedisServer],
) -> None:
    base, _ = redis_app
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        # B pre-warms its context; A cannot name B, nor see B's key.
        b = await http.post("/v1/augmentations", json={"context": CONTEXT}, headers=_h("key-b"))
        assert b.status_code == 200, b.text
        b_key = b.json()["data"][0]["key"]
        as_b = await http.post(
            "/v1/augmentations",
            json={"context": CONTEXT, "tenant": "tenant-b"},
            headers=_h("key-a"),
        )
        assert _is_openai_error(as_b, 403)["code"] == "tenant_not_allowed"
        listed = await http.post(
            "/v1/augmentations",
            json={"contexts": [{"context": CONTEXT, "tenant": "tenant-b"}]},
            headers=_h("key-a"),
        )
        _is_openai_error(listed, 403)
        # Naming its own tenant is fine, and gives A its own key, not B's.
        a = await http.post(
            "/v1/augmentations",
            json={"context": CONTEXT, "tenant": "tenant-a"},
            headers=_h("key-a"),
        )
        a_key = a.json()["data"][0]["key"]
        assert a_key != b_key

        seen_by_a = await http.get(f"/v1/augmentations/{b_key}", headers=_h("key-a"))
        absent = await http.get(f"/v1/augmentations/{'c' * 64}", headers=_h("key-a"))
        assert _is_openai_error(seen_by_a, 404)["code"] == "augmentation_not_found"
        assert _is_openai_error(absent, 404)["code"] == "augmentation_not_found"
        assert seen_by_a.json()["error"]["message"].replace(b_key, "K") == absent.json()["error"][
            "message"
        ].replace("c" * 64, "K")
        own = await http.get(f"/v1/augmentations/{b_key}", headers=_h("key-b"))
        assert own.status_code == 200 and own.json()["state"] == "pending"
        # An operator key bound to '*' may act for and look at any tenant.
        ops = await http.get(f"/v1/augmentations/{b_key}", headers=_h("key-ops"))
        assert ops.status_code == 200
        ops_as_b = await http.post(
            "/v1/augmentations",
            json={"context": CONTEXT, "tenant": "tenant-b"},
            headers=_h("key-ops"),
        )
        assert ops_as_b.json()["data"][0]["key"] == b_key


def test_api_keys_map_to_tenants_from_the_setting_and_the_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# key tenant\nk-file tenant-f\n\nk-bare   \nk-any *  # operators\n")
    settings = Settings(api_keys="k1, k2:tenant-2,k3:*", api_keys_file=keys, tenant="dflt")
    assert settings.api_key_tenants() == {
        "k1": "dflt",
        "k2": "tenant-2",
        "k3": "*",
        "k-file": "tenant-f",
        "k-bare": "dflt",
        "k-any": "*",
    }
    assert Settings().api_key_tenants() == {}
    keys.write_text("a b c\n")
    with pytest.raises(ValueError, match="key \\[tenant\\]"):
        Settings(api_keys_file=keys).api_key_tenants()


def test_the_payload_secret_comes_from_the_env_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings().payload_mac_key() is None  # off by default
    secret_file = tmp_path / "payload-secret"
    secret_file.write_text("file-secret-0123456789\n")
    assert Settings(payload_secret_file=secret_file).payload_mac_key() == b"file-secret-0123456789"
    monkeypatch.setenv("DELIBERATE_PAYLOAD_SECRET", "env-secret-0123456789")
    settings = Settings()
    assert settings.payload_mac_key() == b"env-secret-0123456789"
    assert "env-secret" not in repr(settings)  # a SecretStr: never in a log line
    with pytest.raises(ValueError, match="not both"):
        Settings(payload_secret_file=secret_file).payload_mac_key()
    monkeypatch.setenv("DELIBERATE_PAYLOAD_SECRET", "short")
    with pytest.raises(ValueError, match="shorter than 16"):
        Settings().payload_mac_key()


# --- item 3: the key comparison -------------------------------------------------------------


async def test_keys_are_compared_in_constant_time(
    redis_app: tuple[str, RedisServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = redis_app
    compared: list[tuple[bytes, bytes]] = []
    real = app_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        assert (await http.get("/v1/models", headers=_h("key-b"))).status_code == 200
        assert len(compared) == len(KEYS)  # every key compared, not up to the match
        assert (await http.get("/v1/models", headers=_h("key-x"))).status_code == 401
        assert (await http.get("/v1/models")).status_code == 401


def test_warns_when_auth_is_off_beyond_loopback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="deliberate.serve"):
        assert warn_if_open("0.0.0.0", {})
        assert "authentication is off" in caplog.text
        caplog.clear()
        assert not warn_if_open("127.0.0.1", {})
        assert not warn_if_open("::1", {})
        assert not warn_if_open("localhost", {})
        assert not warn_if_open("0.0.0.0", {"k": "t"})
        assert caplog.text == ""


# --- item 2: what is public ---------------------------------------------------------------


async def test_docs_are_off_by_default_and_metrics_need_a_key(
    redis_server_factory: ServerFactory, decoder_parts: DecoderParts
) -> None:
    store = open_store(redis_server_factory().url, registry=CollectorRegistry(), **FAST)
    try:
        state = make_state(decoder_parts, store, api_keys=KEYS, metrics_key="scrape-token")
        async with serving(state) as base, httpx.AsyncClient(base_url=base) as http:
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert (await http.get(path)).status_code == 404, path
            _is_openai_error(await http.get("/metrics"), 401)
            _is_openai_error(await http.get("/metrics", headers=_h("wrong")), 401)
            for key in ("scrape-token", "key-a"):
                metrics = await http.get("/metrics", headers=_h(key))
                assert metrics.status_code == 200
                assert "deliberate_store_errors_total" in metrics.text
            # The scrape token is for /metrics only.
            assert (await http.get("/v1/models", headers=_h("scrape-token"))).status_code == 401
            ready = await http.get("/ready")
            assert ready.status_code == 503
            assert ready.json() == {"status": "engine unavailable"}  # no exception text
            # /health fails too (vLLM's liveness): this engine's health check raises.
            health = await http.get("/health")
            assert health.status_code == 503
            assert health.json() == {"status": "engine dead"}  # no exception text either
        await store.close()
        store = open_store(None, registry=CollectorRegistry())
        open_state = make_state(decoder_parts, store)
        async with serving(open_state, docs=True) as base, httpx.AsyncClient(base_url=base) as http:
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert (await http.get(path)).status_code == 200, path
            assert (await http.get("/metrics")).status_code == 200  # no keys: open, as before
    finally:
        await store.close()


# --- item 7: limits -----------------------------------------------------------------------


async def test_an_oversized_chunked_body_gets_413(redis_app: tuple[str, RedisServer]) -> None:
    base, _ = redis_app

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"context": "'
        for _ in range(40):
            yield b"a" * 32768  # 1.25 MiB in all, over the 1 MiB limit, no Content-Length
        yield b'"}'

    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        response = await http.post(
            "/v1/augmentations",
            content=chunks(),
            headers={**_h("key-a"), "Content-Type": "application/json"},
        )
        assert _is_openai_error(response, 413)["code"] == "request_too_large"
        small = await http.post(
            "/v1/augmentations",
            content=_one(b'{"context": "' + CONTEXT.encode() + b'"}'),
            headers={**_h("key-a"), "Content-Type": "application/json"},
        )
        assert small.status_code == 200, small.text  # a chunked body within the limit


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_requests_over_the_concurrency_limit_get_503(
    redis_server_factory: ServerFactory, decoder_parts: DecoderParts
) -> None:
    server = redis_server_factory()
    store = open_store(server.url, registry=CollectorRegistry(), **(FAST | {"op_timeout_s": 1.5}))
    try:
        state = make_state(decoder_parts, store)
        async with (
            serving(state, max_concurrent_requests=1) as base,
            httpx.AsyncClient(base_url=base, timeout=30) as http,
        ):
            server.pause()  # the first pre-warm holds its slot until the store times out
            try:
                first = asyncio.create_task(
                    http.post("/v1/augmentations", json={"context": CONTEXT})
                )
                await asyncio.sleep(0.5)
                second = await http.post("/v1/augmentations", json={"context": CONTEXT + "!"})
                error = _is_openai_error(second, 503)
                assert error["code"] == "overloaded"
                assert second.headers["retry-after"] == "1"
                assert (await first).status_code == 503  # the store's own answer
            finally:
                server.resume()
            again = await http.post("/v1/augmentations", json={"context": CONTEXT})
            assert again.status_code == 200, again.text  # the slot was given back
    finally:
        await store.close()


class _ThreadRecordingTokenizer:
    """The real tokenizer, noting which thread each call runs on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.threads: list[int] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in ("encode", "apply_chat_template"):
            return attr

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.threads.append(threading.get_ident())
            return attr(*args, **kwargs)

        return recorded


async def test_tokenization_runs_off_the_event_loop(
    redis_server_factory: ServerFactory, decoder_parts: DecoderParts
) -> None:
    store = open_store(redis_server_factory().url, registry=CollectorRegistry(), **FAST)
    tokenizer = _ThreadRecordingTokenizer(decoder_parts.tokenizer)
    try:
        state = make_state(decoder_parts, store, tokenizer=tokenizer)
        async with serving(state) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
            response = await http.post("/v1/augmentations", json={"context": CONTEXT})
            assert response.status_code == 200, response.text
        assert tokenizer.threads
        assert threading.get_ident() not in tokenizer.threads  # this test runs on the loop
    finally:
        await store.close()
