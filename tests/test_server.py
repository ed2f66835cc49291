"""End to end over real HTTP: `deliberate serve` (real vLLM) and `deliberate worker` processes
sharing a real redis-server, driven by the official openai client."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cache_store.checkpoint import read_evaluation
from coprocessor_worker.checkpoints import bundled_checkpoint_dir
from tests.fixtures.processes import ServiceProcess, start_server, start_worker
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.slow

API_KEY = "test-key-1"
DOCUMENT = (
    "The Kestrel Valley railway opened in 1887 to carry slate from the quarries at Penrhos "
    "down to the harbour at Aberkell. For forty years it ran three trains a day; passengers "
    "were carried only from 1901, in two wooden carriages that still survive in the museum at "
    "Aberkell. The line closed in 1931, when the last quarry shut, and its track bed is now a "
    "footpath that follows the river for eleven miles.\n\n"
)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def server(module_redis: RedisServer, logs: Path, untrained_checkpoint: Path) -> Iterator[str]:
    process, base = start_server(
        logs,
        "--coprocessor",
        str(untrained_checkpoint),
        "--redis-url",
        module_redis.url,
        "--no-embedded-worker",
        "--api-keys",
        API_KEY,
        "--allow-unvalidated-coprocessor",
        # These tests are about the hit path; the value check has its own below.
        "--no-value-check",
        "--lookup-timeout-seconds",
        "0.25",  # generous: the test machine is shared and noisy
    )
    yield base
    process.stop()


@pytest.fixture(scope="module")
def worker(
    module_redis: RedisServer, logs: Path, server: str, untrained_checkpoint: Path
) -> Iterator[ServiceProcess]:
    process = start_worker(
        logs,
        module_redis.url,
        "--coprocessor",
        str(untrained_checkpoint),
        "--visibility-timeout-seconds",
        "10",
        "--no-value-check",
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _completion(server: str, body: dict, api_key: str = API_KEY) -> httpx.Response:
    return httpx.post(
        f"{server}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=120,
    )


def _wait_ready_key(server: str, key: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        state = httpx.get(
            f"{server}/v1/augmentations/{key}",
            headers={"Authorization": f"Bearer {API_KEY}"},
        ).json()["state"]
        if state == "ready":
            return
        time.sleep(0.5)
    raise AssertionError(f"key {key} still {state} after {timeout_s} s")


def test_openai_client_completions_chat_and_streaming(client: openai.OpenAI, model: str) -> None:
    completion = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text.strip()
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.choices[0].message.content

    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=model,
            prompt="The capital of France is",
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    assert streamed == completion.choices[0].text

    chat_streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        if chunk.choices
    )
    assert chat_streamed == chat.choices[0].message.content


def test_miss_then_hit_changes_the_distribution(
    server: str, worker: ServiceProcess, model: str
) -> None:
    body = {
        "model": model,
        "context": DOCUMENT,
        "prompt": "Question: When did the line close?\nAnswer:",
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": 5,
    }
    first = _completion(server, body)
    assert first.status_code == 200, first.text
    assert first.headers["X-Deliberate-Augmentation"] == "miss-enqueued"
    key = first.json()["augmentation"]["key"]
    assert first.headers["X-Deliberate-Key"] == key

    _wait_ready_key(server, key)
    hit = _completion(server, body)
    assert hit.status_code == 200, hit.text
    augmentation = hit.json()["augmentation"]
    assert augmentation["status"] == "hit"
    assert augmentation["n_latents"] > 0

    plain = _completion(server, {**body, "augment": False})
    assert plain.json()["augmentation"]["status"] == "disabled"
    hit_top = hit.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    plain_top = plain.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    # Same prompt tokens; only the latents differ: the first-token distribution must move.
    assert hit_top != plain_top
    # And the miss was answered plainly: identical to augment=false.
    assert first.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


async def test_plain_path_matches_vllm(
    server: str, model: str, vllm_engine: object, bundled_decoder: Path
) -> None:
    """The plain path adds nothing: same greedy text as vLLM given the whole prompt as text.
    (The context ends where the tokenizer would split anyway, so the texts tokenize alike.)"""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    context, prompt = DOCUMENT.rstrip(), "\nQuestion: Where is the museum?\nAnswer:"
    async with httpx.AsyncClient(timeout=120) as http:
        response = await http.post(
            f"{server}/v1/completions",
            json={
                "model": model,
                "context": context,
                "prompt": prompt,
                "max_tokens": 16,
                # In bf16 (CPUs with AVX512-BF16) the first greedy token is the end of text;
                # a few forced tokens keep the comparison from being two empty strings.
                "min_tokens": 4,
                "temperature": 0,
                "augment": False,
            },
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    ours = response.json()["choices"][0]["text"]
    ids = AutoTokenizer.from_pretrained(bundled_decoder)(context + prompt).input_ids
    final = None
    async for out in vllm_engine.generate(  # type: ignore[attr-defined]
        {"prompt_token_ids": ids},
        SamplingParams(temperature=0, max_tokens=16, min_tokens=4),
        "reference",
    ):
        final = out
    assert final is not None
    assert len(ours) > 0
    assert ours == final.outputs[0].text


def test_bad_inputs_get_clear_4xx(server: str, model: str, client: openai.OpenAI) -> None:
    cases = {
        "wrong type": ({"model": model, "prompt": "hi", "max_tokens": "many"}, 400),
        "unknown model": ({"model": "gpt-17", "prompt": "hi"}, 404),
        "client embeddings": ({"model": model, "prompt": "hi", "prompt_embeds": "AAAA"}, 400),
        "oversized context": ({"model": model, "prompt": "hi", "context": "word " * 5000}, 400),
        "too many tokens": ({"model": model, "prompt": "hi", "max_tokens": 10**6}, 400),
        "negative temperature": ({"model": model, "prompt": "hi", "temperature": -1}, 400),
    }
    for name, (body, code) in cases.items():
        response = _completion(server, body)
        assert response.status_code == code, (name, response.text)
        error = response.json()["error"]
        assert error["message"], name
    assert _completion(server, {"model": model, "prompt": "hi"}, api_key="wrong").status_code == 401
    huge = httpx.post(
        f"{server}/v1/completions",
        content=b'{"model": "x", "prompt": "' + b"a" * (2 << 20) + b'"}',
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert huge.status_code == 413
    # Still serving after all of that.
    assert client.completions.create(model=model, prompt="Hi", max_tokens=2).choices


def test_store_outage_degrades_to_plain_and_recovers(
    server: str, worker: ServiceProcess, module_redis: RedisServer, model: str
) -> None:
    body = {
        "model": model,
        "context": DOCUMENT + "Second copy.\n",
        "prompt": "Summary:",
        "max_tokens": 4,
        "temperature": 0,
    }
    module_redis.stop()
    try:
        for _ in range(3):
            response = _completion(server, body)
            assert response.status_code == 200, response.text
            assert response.json()["augmentation"]["status"] == "store-unavailable"
    finally:
        module_redis.start()
    # Redis came back empty (no persistence): the context is queued again, then served.
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        status = _completion(server, body).json()["augmentation"]
        if status["status"] == "miss-enqueued":
            break
        time.sleep(0.5)
    assert status is not None and status["status"] == "miss-enqueued", status
    _wait_ready_key(server, status["key"])
    assert _completion(server, body).json()["augmentation"]["status"] == "hit"


def test_prewarm_api_and_enqueue_cli(
    server: str, worker: ServiceProcess, model: str, tmp_path: Path
) -> None:
    import json
    import subprocess
    import sys

    contexts = [f"Visitor log, day {day}. " + DOCUMENT for day in range(3)]
    lines = [json.dumps({"context": c}) for c in contexts] + [json.dumps({"context": "Hi."})]
    jsonl = tmp_path / "contexts.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "deliberate",
            "enqueue",
            str(jsonl),
            "--url",
            server,
            "--api-key",
            API_KEY,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith("3 new, 0 ready, 0 pending, 0 refused, 0 failed")

    response = httpx.post(
        f"{server}/v1/augmentations",
        json={"contexts": [{"context": c} for c in contexts]},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert {d["outcome"] for d in data} <= {"already_pending", "already_ready"}
    for item in data:
        _wait_ready_key(server, item["key"])
    # The pre-warmed key is the one a completion with that context uses: a hit at once.
    hit = _completion(
        server, {"model": model, "context": contexts[0], "prompt": "Summary:", "max_tokens": 2}
    )
    assert hit.json()["augmentation"] == {
        "status": "hit",
        "key": data[0]["key"],
        "n_latents": hit.json()["augmentation"]["n_latents"],
    }
    assert (
        _completion(server, {"model": model, "prompt": "x", "max_tokens": 1}).json()[
            "augmentation"
        ]["status"]
        == "no-context"
    )


def test_embedded_default_answers_plainly_while_its_gate_fails(logs: Path) -> None:
    """`deliberate serve` as the README runs it: bundled decoder and coprocessor, in-memory
    store and a worker in the process, no override. The bundled checkpoint's recorded gate
    fails, raw and with the value check (docs/coprocessor.md, session 17), so latents are
    neither computed nor served: answered plainly at once, saying so, and no work queued.
    `--allow-unvalidated-coprocessor` is the override the other tests here run with."""
    _, gate = read_evaluation(bundled_checkpoint_dir())
    assert gate["passed"] is False and gate["passed_with_value_check"] is False
    process, base = start_server(logs)
    try:
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "context": DOCUMENT, "prompt": "Summary:", "max_tokens": 4}
        for _ in range(2):
            response = httpx.post(f"{base}/v1/completions", json=body, timeout=180)
            assert response.status_code == 200, response.text
            assert response.json()["augmentation"]["status"] == "skipped-unvalidated"
        metrics = httpx.get(f"{base}/metrics").text
        assert (
            'deliberate_requests_total{endpoint="completions",status="skipped-unvalidated"} 2.0'
            in metrics
        )
        assert 'deliberate_worker_jobs_total{outcome="done"} 0.0' in metrics
    finally:
        assert process.stop() == 0


def _engine_running(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running{")
    )


def test_sigterm_lets_requests_finish_within_the_shutdown_timeout(logs: Path) -> None:
    """SIGTERM: no new connections, the request in progress answered in full, the one that
    would outlast `--shutdown-timeout-seconds` cut short there, and the process gone (exit
    0) soon after, not when its last request ends."""
    timeout_s = 10.0
    process, base = start_server(
        logs, "--no-embedded-worker", "--shutdown-timeout-seconds", str(timeout_s)
    )
    try:
        warm = {"prompt": "The railway", "max_tokens": 32, "ignore_eos": True}
        # The rate from a second request: the first one's warm-up would understate it, and a
        # short request sized from that would end before the two ran together.
        for _ in range(2):
            started = time.monotonic()
            response = httpx.post(f"{base}/v1/completions", json=warm, timeout=120)
            assert response.status_code == 200, response.text
        rate = 32 / (time.monotonic() - started)  # tokens per second, one sequence
        short_tokens = max(8, int(rate * 5))  # about 5 s: still running at SIGTERM
        assert 1900 / rate > 3 * timeout_s, f"{rate:.0f} tokens/s: the long request is too short"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            short = pool.submit(_timed_completion, base, short_tokens)
            long = pool.submit(_timed_completion, base, 1900)
            deadline = time.monotonic() + 60
            while _engine_running(base) < 2:
                assert not short.done(), f"the short request ended alone ({rate:.0f} tokens/s)"
                assert time.monotonic() < deadline, "the two requests never ran together"
                time.sleep(0.1)
            terminated = time.monotonic()
            # To the server process alone, as Kubernetes and `docker stop` signal a container's
            # PID 1: vLLM's engine core, in the same process group, stops at once on its own
            # SIGTERM, failing what it runs; the server shuts it down once drained.
            process.process.send_signal(signal.SIGTERM)
            done, response = short.result(timeout=120)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == short_tokens
            assert done > terminated  # it was in progress when the signal came
            assert process.process.poll() is None  # still draining, and yet:
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{base}/health", timeout=5)
            exit_code = process.process.wait(timeout=timeout_s + 60)
            exited = time.monotonic() - terminated
            _, cut = long.result(timeout=10)
            assert not isinstance(cut, httpx.Response) or cut.status_code != 200
        assert exit_code == 0, process.log_tail()
        # The timeout, then the engine's and the store's shutdown on a busy machine.
        assert timeout_s <= exited < timeout_s + 30, exited
    finally:
        process.stop()


def _timed_completion(base: str, max_tokens: int) -> tuple[float, httpx.Response | Exception]:
    body = {"prompt": "The railway", "max_tokens": max_tokens, "ignore_eos": True}
    try:
        response: httpx.Response | Exception = httpx.post(
            f"{base}/v1/completions", json=body, timeout=300
        )
    except httpx.HTTPError as exc:  # the server went away before answering
        response = exc
    return time.monotonic(), response
