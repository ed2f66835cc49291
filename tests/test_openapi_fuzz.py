"""Schemathesis over the server's own OpenAPI schema (issue 13's chaos suite): every
operation fuzzed over real HTTP on loopback against the real app, the real vLLM engine and
the bundled SmolLM2. No response may be a 5xx, and every 4xx body is OpenAI's error shape.

Bounded for CI: MAX_EXAMPLES cases per operation, and generated bodies whose lengths would
make the engine decode for long (max_tokens, min_tokens, n, augment_wait_seconds) are folded
into small values; values past the model's limits are left alone (they must be 400s)."""

from __future__ import annotations

import asyncio
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from prometheus_client import CollectorRegistry
from schemathesis.checks import not_a_server_error

from cache_store import open_store
from server.app import create_app
from tests.fixtures.app_server import DecoderParts, make_state, serving

pytestmark = pytest.mark.slow
MAX_EXAMPLES = 20
MAX_MODEL_LEN = 2048
ERROR_KEYS = {"message", "type", "param", "code"}


def _fold(body: Any) -> Any:
    """Keep a generated generation request quick to answer."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 8 < value <= MAX_MODEL_LEN:
            body[key] = 1 + value % 8
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 2 < n <= 16:
        body["n"] = 1 + n % 2
    if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4  # the chat default is the whole context: ~2000 tokens
    wait = body.get("augment_wait_seconds")
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 0.2:
        body["augment_wait_seconds"] = 0.2
    return body


def _error_shape_problem(response: requests.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != ERROR_KEYS or set(body) != {"error"}:
        return f"not the OpenAI error shape: {body!r}"[:500]
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return f"message/type not strings: {body!r}"[:500]
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return f"param/code neither null nor strings: {body!r}"[:500]
    return None


def _fuzz_operation(
    operation: Any,
    base_url: str,
    session: requests.Session,
    seen: dict[int, int],
    failures: list[str],
) -> None:
    label = operation.label

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        case.body = _fold(case.body)
        response = case.call(base_url=base_url, session=session, timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error])  # raises on a 5xx
        if 400 <= response.status_code < 500:
            problem = _error_shape_problem(response)
            if problem:
                failures.append(f"{label}: {response.status_code} {problem} <- {case.body!r}")

    run()


def _fuzz(openapi: dict[str, Any], base_url: str) -> dict[str, Any]:
    """Run every operation's cases (blocking: called in a thread, the server's loop runs)."""
    schema = schemathesis.openapi.from_dict(openapi)
    statuses: dict[str, dict[int, int]] = {}
    failures: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            seen = statuses.setdefault(operation.label, {})
            _fuzz_operation(operation, base_url, session, seen, failures)
    return {"statuses": statuses, "failures": failures}


async def test_openapi_fuzz_no_5xx_and_openai_error_shape(
    decoder_parts: DecoderParts, vllm_engine: object
) -> None:
    store = open_store(None, registry=CollectorRegistry())
    state = make_state(decoder_parts, store, engine=vllm_engine, max_model_len=MAX_MODEL_LEN)
    openapi = create_app(state, docs=True, max_request_bytes=1 << 20).openapi()
    try:
        async with serving(state) as base:
            report = await asyncio.to_thread(_fuzz, openapi, base)
            # What it found: vLLM's VLLMValidationError (not a ValueError) was a 500.
            for body in ({"prompt": ""}, {"prompt": "", "max_tokens": 1, "n": 2}):
                found = await asyncio.to_thread(
                    requests.post, f"{base}/v1/completions", json=body, timeout=60
                )
                assert found.status_code == 400, (body, found.text)
                assert _error_shape_problem(found) is None, found.text
    finally:
        await store.close()
    statuses = report["statuses"]
    total = sum(sum(s.values()) for s in statuses.values())
    print(f"\nopenapi fuzz: {total} cases over {len(statuses)} operations")
    for label, seen in sorted(statuses.items()):
        print(f"  {label}: {dict(sorted(seen.items()))}")
    assert total >= len(statuses) * 5, statuses
    assert not report["failures"], "\n".join(report["failures"][:20])
