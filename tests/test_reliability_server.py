"""Generation over real HTTP with the real vLLM engine (one per session) and a real
redis-server: store error replies answered plainly, the cross-tenant oracle closed, per-
tenant cache salts, and requests that used to reach vLLM and come back as 500s."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry

from cache_store import encode_payload, open_store
from cache_store.factory import redis_client
from cache_store.keys import payload_key
from server.app import cache_salt
from tests.fixtures.app_server import DecoderParts, make_state, serving
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.store_backends import FAST, sample
from tests.test_reliability_store import FAULTS, _server

pytestmark = pytest.mark.slow
ServerFactory = Callable[..., RedisServer]
DOCUMENT = (
    "The Kestrel Valley railway opened in 1887 to carry slate from the quarries at Penrhos "
    "down to the harbour at Aberkell. For forty years it ran three trains a day; passengers "
    "were carried only from 1901, in two wooden carriages that still survive in the museum."
)
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}


class RecordingEngine:
    """The real engine; remembers each prompt it was given (to read the cache salt)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.prompts: list[dict[str, Any]] = []

    def generate(self, prompt: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.prompts.append(prompt)
        return self.engine.generate(prompt, *args, **kwargs)

    async def check_health(self) -> None:
        await self.engine.check_health()


def _completion(context: str | None = DOCUMENT, **extra: Any) -> dict[str, Any]:
    body = {"model": "smollm2", "prompt": "Question: When?\nAnswer:", "max_tokens": 2}
    return body | ({"context": context} if context else {}) | extra


@pytest.mark.parametrize("code", list(FAULTS))
async def test_store_error_replies_are_answered_plainly(
    redis_server_factory: ServerFactory,
    decoder_parts: DecoderParts,
    vllm_engine: object,
    code: str,
) -> None:
    server = _server(redis_server_factory)
    with FAULTS[code](server) as url:
        store = open_store(url, registry=CollectorRegistry(), **FAST)
        state = make_state(decoder_parts, store, engine=vllm_engine)
        try:
            async with serving(state) as base, httpx.AsyncClient(base_url=base, timeout=120) as h:
                for _ in range(2):
                    response = await h.post("/v1/completions", json=_completion())
                    assert response.status_code == 200, response.text
                    assert response.json()["augmentation"]["status"] == "store-unavailable"
                    assert response.json()["choices"][0]["text"] is not None
        finally:
            await store.close()


async def test_key_a_cannot_learn_or_use_tenant_b_augmentations(
    redis_server_factory: ServerFactory, decoder_parts: DecoderParts, vllm_engine: object
) -> None:
    store = open_store(redis_server_factory().url, registry=CollectorRegistry(), **FAST)
    engine = RecordingEngine(vllm_engine)
    state = make_state(decoder_parts, store, engine=engine, api_keys=KEYS)
    n_latents, hidden = decoder_parts.checkpoint.n_latents, decoder_parts.embeddings.hidden_size
    try:
        async with serving(state) as base, httpx.AsyncClient(base_url=base, timeout=120) as h:
            auth_a, auth_b = ({"Authorization": f"Bearer {k}"} for k in KEYS)
            first_b = await h.post("/v1/completions", json=_completion(), headers=auth_b)
            assert first_b.json()["augmentation"]["status"] == "miss-enqueued"
            b_key = first_b.json()["augmentation"]["key"]
            # B's job is computed (here: published by hand, as a worker would).
            [delivery] = await store.claim_jobs("w", 1, 1.0)
            assert delivery.job.key == b_key and delivery.job.tenant == "tenant-b"
            latents = torch.randn(n_latents, hidden, generator=torch.Generator().manual_seed(0))
            await store.publish(
                delivery,
                encode_payload(
                    latents * 0.1,
                    key=b_key,
                    decoder_fp=delivery.job.decoder_fp,
                    coprocessor_fp=delivery.job.coprocessor_fp,
                    prefix_len=delivery.job.prefix_len,
                ),
            )
            hit_b = await h.post("/v1/completions", json=_completion(), headers=auth_b)
            assert hit_b.json()["augmentation"]["status"] == "hit"

            # A, with the same context: its own key, a miss; never B's latents or key.
            a = await h.post("/v1/completions", json=_completion(), headers=auth_a)
            assert a.json()["augmentation"]["status"] == "miss-enqueued"
            assert a.json()["augmentation"]["key"] != b_key
            as_b = await h.post(
                "/v1/completions", json=_completion(tenant="tenant-b"), headers=auth_a
            )
            assert as_b.status_code == 403
            assert as_b.json()["error"]["code"] == "tenant_not_allowed"
            chat_as_b = await h.post(
                "/v1/chat/completions",
                json={
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "tenant": "tenant-b",
                },
                headers=auth_a,
            )
            assert chat_as_b.status_code == 403
            assert (await h.get(f"/v1/augmentations/{b_key}", headers=auth_a)).status_code == 404
            assert (await h.get(f"/v1/augmentations/{b_key}", headers=auth_b)).json()[
                "state"
            ] == "ready"
    finally:
        await store.close()
    # Every prompt carried its tenant's salt: token prompts and the embeddings of B's hit.
    salts = [(("prompt_embeds" in p), p.get("cache_salt")) for p in engine.prompts]
    assert salts == [
        (False, cache_salt("tenant-b")),
        (True, cache_salt("tenant-b")),
        (False, cache_salt("tenant-a")),
    ]
    assert cache_salt("tenant-a") != cache_salt("tenant-b")


async def test_requests_that_reached_vllm_as_500s_are_400s(
    decoder_parts: DecoderParts, vllm_engine: object
) -> None:
    store = open_store(None, registry=CollectorRegistry())
    state = make_state(decoder_parts, store, engine=vllm_engine, max_model_len=2048)
    async with serving(state) as base, httpx.AsyncClient(base_url=base, timeout=120) as h:
        # A chat prompt that fills the model's context: no room for one token.
        long = " ".join(["railway"] * 2100)
        chat = await h.post(
            "/v1/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": long}]},
        )
        assert chat.status_code == 400, chat.text
        assert chat.json()["error"]["code"] == "context_length_exceeded"
        for seed in (2**63, -(2**63) - 1, 10**30):
            response = await h.post("/v1/completions", json=_completion(None, seed=seed))
            assert response.status_code == 400, (seed, response.text)
            assert response.json()["error"]["param"] == "seed"
        fine = await h.post("/v1/completions", json=_completion(None, seed=2**63 - 1))
        assert fine.status_code == 200, fine.text
        # Still serving after all of that.
        assert (await h.get("/ready")).status_code == 200
    await store.close()


async def test_a_redis_writer_without_the_payload_secret_cannot_inject_latents(
    redis_server_factory: ServerFactory, decoder_parts: DecoderParts, vllm_engine: object
) -> None:
    secret = b"payload-secret-for-tests-0123"
    redis = redis_server_factory()
    store = open_store(redis.url, registry=CollectorRegistry(), **FAST)
    state = make_state(decoder_parts, store, engine=vllm_engine, payload_secret=secret)
    n_latents, hidden = decoder_parts.checkpoint.n_latents, decoder_parts.embeddings.hidden_size
    latents = torch.randn(n_latents, hidden, generator=torch.Generator().manual_seed(0)) * 0.1

    def payload(job: Any, signed_with: bytes | None) -> bytes:
        return encode_payload(
            latents,
            key=job.key,
            decoder_fp=job.decoder_fp,
            coprocessor_fp=job.coprocessor_fp,
            prefix_len=job.prefix_len,
            secret=signed_with,
        )

    async def status(h: httpx.AsyncClient) -> str:
        response = await h.post("/v1/completions", json=_completion())
        assert response.status_code == 200, response.text
        return str(response.json()["augmentation"]["status"])

    try:
        async with serving(state) as base, httpx.AsyncClient(base_url=base, timeout=120) as h:
            assert await status(h) == "miss-enqueued"
            [delivery] = await store.claim_jobs("w", 1, 1.0)
            job = delivery.job
            # Through the store's own publish (which checks everything but the MAC), and
            # straight into Redis with another secret: a miss each time, as for a corrupt
            # payload, counted and discarded.
            await store.publish(delivery, payload(job, None))
            assert await status(h) == "miss-enqueued"
            raw = redis_client(redis.url, op_timeout_s=5.0)
            try:
                await raw.set(payload_key(job.key), payload(job, b"not-the-secret-0123456789"))
            finally:
                await raw.aclose()
            assert await status(h) == "miss-enqueued"
            assert (
                sample(store, "deliberate_store_payload_rejected_total", reason="mac_mismatch") == 2
            )
            # A worker holding the secret: served.
            [delivery] = await store.claim_jobs("w", 1, 1.0)
            await store.publish(delivery, payload(job, secret))
            assert await status(h) == "hit"
    finally:
        await store.close()


async def test_a_client_that_disconnects_aborts_its_generation(
    decoder_parts: DecoderParts, vllm_engine: Any
) -> None:
    store = open_store(None, registry=CollectorRegistry())
    state = make_state(decoder_parts, store, engine=vllm_engine)
    # Long enough to run for minutes on this CPU if nothing stops it.
    body = json.dumps(_completion(None, max_tokens=1800, ignore_eos=True)).encode()
    async with serving(state) as base:
        port = int(base.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        deadline = time.monotonic() + 60
        while vllm_engine.get_num_unfinished_requests() == 0:
            assert time.monotonic() < deadline, "the request never reached the engine"
            await asyncio.sleep(0.05)
        writer.close()  # the client gives up before the answer
        await writer.wait_closed()
        deadline = time.monotonic() + 10
        while vllm_engine.get_num_unfinished_requests() or not _disconnects(state):
            assert time.monotonic() < deadline, (
                f"{vllm_engine.get_num_unfinished_requests()} engine request(s) still running "
                f"10 s after the client left; disconnects counted: {_disconnects(state)}"
            )
            await asyncio.sleep(0.05)
        assert _disconnects(state) == 1
        # The server carries on.
        async with httpx.AsyncClient(base_url=base, timeout=120) as h:
            fine = await h.post("/v1/completions", json=_completion(None))
            assert fine.status_code == 200, fine.text
    await store.close()


def _disconnects(state: Any) -> float:
    value = state.registry.get_sample_value(
        "deliberate_requests_disconnected_total", {"endpoint": "completions"}
    )
    return value or 0.0
