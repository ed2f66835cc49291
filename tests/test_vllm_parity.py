"""Parity with `vllm serve` (issue 14): every parameter honoured or refused by name, the
prompt forms vLLM takes, /tokenize, /detokenize, /version, vLLM's flags reaching the engine,
vLLM's `vllm:` metrics on /metrics and /health failing with a dead engine.

The fast tests use the real app without an engine (refusals happen before generation); the
slow ones the session's real vLLM engine, greedy, and compare with what vLLM itself gives
for the same sampling parameters."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from cache_store import open_store
from tests.fixtures.app_server import DecoderParts, make_state, serving

PROMPT = "The Kestrel Valley railway opened in 1887 to carry slate from the quarries. It"
REPETITIVE = "one two three one two three one two three one two three"


@pytest.fixture
async def plain_app(decoder_parts: DecoderParts) -> AsyncIterator[httpx.AsyncClient]:
    store = open_store(None, registry=CollectorRegistry())
    state = make_state(decoder_parts, store, aliases=("alias-a",))
    async with serving(state) as base, httpx.AsyncClient(base_url=base, timeout=60) as http:
        yield http
    await store.close()


def _error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error  # type: ignore[no-any-return]


REFUSED = {
    # unknown or unsupported fields, each refused by name
    "best_of": ("/v1/completions", {"prompt": "x", "best_of": 2}),
    "use_beam_search": ("/v1/completions", {"prompt": "x", "use_beam_search": True}),
    "frobnicate": ("/v1/completions", {"prompt": "x", "frobnicate": 1}),
    "parallel_tool_calls": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": True},
    ),
    "messages.0.audio": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x", "audio": {}}]},
    ),
    "stream_options.foo": ("/v1/completions", {"prompt": "x", "stream_options": {"foo": 1}}),
    "suffix": ("/v1/completions", {"prompt": "x", "suffix": "tail"}),
    # supported fields with values vLLM refuses too
    "logit_bias": ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 5}}),
    "top_k": ("/v1/completions", {"prompt": "x", "top_k": -5}),
    "min_p": ("/v1/completions", {"prompt": "x", "min_p": 2}),
    "repetition_penalty": ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}),
    "response_format.type": (
        "/v1/completions",
        {"prompt": "x", "response_format": {"type": "xml"}},
    ),
    "tool_choice": (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },  # tool_choice defaults to "auto", which needs a tool-call parser
    ),
    "prompt": ("/v1/completions", {"prompt": [1, 2, 10**7]}),
    "echo": (
        "/v1/completions",
        {"prompt": "x", "context": "some context " * 10, "echo": True, "logprobs": 1},
    ),
    "max_tokens": ("/v1/completions", {"prompt": "x", "max_tokens": 0}),
    "prompt_embeds": ("/v1/completions", {"prompt": "x", "prompt_embeds": "QUFB"}),
}


@pytest.mark.parametrize("param", list(REFUSED))
async def test_unsupported_parameters_are_refused_by_name(
    plain_app: httpx.AsyncClient, param: str
) -> None:
    path, body = REFUSED[param]
    error = _error(await plain_app.post(path, json={"model": "smollm2", **body}))
    if param != "prompt_embeds":
        assert error["param"] == param, error
    assert param.split(".")[-1] in error["message"], error


async def test_model_is_optional_and_aliases_are_served(plain_app: httpx.AsyncClient) -> None:
    models = (await plain_app.get("/v1/models")).json()["data"]
    assert [m["id"] for m in models] == ["smollm2", "alias-a"]
    tok = await plain_app.post("/tokenize", json={"prompt": "Hello world"})  # no model
    assert tok.status_code == 200, tok.text
    assert (await plain_app.post("/tokenize", json={"model": "alias-a", "prompt": "Hi"})).is_success
    _error(await plain_app.post("/tokenize", json={"model": "nope", "prompt": "Hi"}), 404)


async def test_tokenize_detokenize_and_version(
    plain_app: httpx.AsyncClient, decoder_parts: DecoderParts
) -> None:
    import vllm

    tokenizer = decoder_parts.tokenizer
    tok = (
        await plain_app.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    ).json()
    assert tok["tokens"] == tokenizer.encode("Hello world")
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 2048
    assert tok["token_strs"] == tokenizer.convert_ids_to_tokens(tok["tokens"])
    chat = (
        await plain_app.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
    ).json()
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    detok = await plain_app.post("/detokenize", json={"tokens": tok["tokens"]})
    assert detok.json() == {"prompt": "Hello world"}
    _error(await plain_app.post("/detokenize", json={"tokens": [10**7]}))
    version = (await plain_app.get("/version")).json()
    assert version["version"] == vllm.__version__


async def test_tool_messages_and_null_content_render(decoder_parts: DecoderParts) -> None:
    from server.prompts import ChatOptions, split_chat
    from server.protocol import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "What is the weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call-1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call-1", "content": "18 C, sunny"},
                {"role": "user", "content": "And tomorrow?"},
            ]
        }
    )
    parts = split_chat(decoder_parts.tokenizer, body.messages, None, ChatOptions())
    text = decoder_parts.tokenizer.decode(parts.context_ids + parts.rest_ids)
    assert "18 C, sunny" in text and "And tomorrow?" in text
    with pytest.raises(ValueError, match="tool_call_id"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "tool", "content": "x"}]})


async def test_health_fails_with_a_dead_engine(decoder_parts: DecoderParts) -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    class DeadEngine:
        """What AsyncLLM.check_health does once its engine core is gone."""

        errored = True

        async def check_health(self) -> None:
            raise EngineDeadError()

    store = open_store(None, registry=CollectorRegistry())
    state = make_state(decoder_parts, store, engine=DeadEngine())
    async with serving(state) as base, httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/health")).status_code == 503
        assert (await http.get("/ready")).status_code == 503
    await store.close()


def test_vllm_flags_reach_the_engine_arguments(tmp_path: Any) -> None:
    from deliberate.cli import build_parser
    from deliberate.commands import settings_from_args
    from deliberate.serving import build_engine_args

    argv = [
        "serve",
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        "7",
        "--served-model-name",
        "main-name",
        "alias",
        "--tensor-parallel-size",
        "1",
        "--kv-cache-dtype",
        "auto",
        "--max-num-batched-tokens",
        "4096",
    ]
    args, extra = build_parser().parse_known_args(argv)
    settings = settings_from_args(args)
    engine = build_engine_args(settings, tmp_path, extra)
    assert engine.max_num_seqs == 7 and engine.max_num_batched_tokens == 4096
    assert engine.served_model_name == ["main-name", "alias"]
    assert engine.max_model_len == 1024  # ours, set over vLLM's
    assert engine.enable_prompt_embeds is True  # forced
    assert engine.model == str(tmp_path) and engine.tokenizer == str(tmp_path)
    assert engine.disable_log_stats is False  # stats on, as vLLM's default
    plain = build_engine_args(settings_from_args(build_parser().parse_args(["serve"])), tmp_path)
    assert plain.served_model_name == tmp_path.name and plain.max_model_len is None
    with pytest.raises(SystemExit):
        build_engine_args(settings, tmp_path, ["--no-such-vllm-flag"])


# --- the real engine -------------------------------------------------------------------------


@pytest.fixture
async def engine_app(
    decoder_parts: DecoderParts, vllm_engine: object
) -> AsyncIterator[httpx.AsyncClient]:
    store = open_store(None, registry=CollectorRegistry())
    state = make_state(decoder_parts, store, engine=vllm_engine, engine_registry=REGISTRY)
    async with serving(state) as base, httpx.AsyncClient(base_url=base, timeout=300) as http:
        yield http
    await store.close()


async def _vllm(engine: Any, tokenizer: Any, prompt: str, **params: Any) -> Any:
    """What vLLM itself generates for the same prompt and sampling parameters."""
    from vllm import SamplingParams

    final = None
    async for out in engine.generate(
        {"prompt_token_ids": tokenizer.encode(prompt)},
        SamplingParams(**params),
        f"reference-{id(params)}",
    ):
        final = out
    return final.outputs[0]


async def _complete(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await http.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.slow
async def test_sampling_parameters_change_the_output_as_vllms_do(
    engine_app: httpx.AsyncClient, vllm_engine: Any, decoder_parts: DecoderParts
) -> None:
    tok = decoder_parts.tokenizer
    greedy = (await _complete(engine_app, max_tokens=12))["choices"][0]
    # top_k=1 is greedy whatever the temperature.
    top1 = await _complete(engine_app, max_tokens=12, temperature=1.0, top_k=1, seed=3)
    assert top1["choices"][0]["text"] == greedy["text"]
    # logit_bias forces a token.
    forced = tok.encode(" banana", add_special_tokens=False)[0]
    biased = await _complete(engine_app, max_tokens=3, logit_bias={str(forced): 100})
    assert biased["choices"][0]["text"] == tok.decode([forced] * 3)
    # stop_token_ids cut the output at that token, and stop_reason names it.
    greedy_ids = tok.encode(greedy["text"], add_special_tokens=False)
    stop_id = greedy_ids[3]
    cut = (await _complete(engine_app, max_tokens=12, stop_token_ids=[stop_id]))["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop_id
    assert len(tok.encode(cut["text"], add_special_tokens=False)) < len(greedy_ids)
    assert greedy["stop_reason"] is None
    # repetition_penalty changes a repetitive output, exactly as vLLM's does.
    for penalty in (1.0, 1.8):
        ours = await engine_app.post(
            "/v1/completions",
            json={
                "prompt": REPETITIVE,
                "max_tokens": 8,
                "temperature": 0,
                "repetition_penalty": penalty,
            },
        )
        ref = await _vllm(
            vllm_engine, tok, REPETITIVE, max_tokens=8, temperature=0, repetition_penalty=penalty
        )
        assert ours.json()["choices"][0]["text"] == ref.text, penalty
    plain_rep = await _vllm(vllm_engine, tok, REPETITIVE, max_tokens=8, temperature=0)
    penalised = await _vllm(
        vllm_engine, tok, REPETITIVE, max_tokens=8, temperature=0, repetition_penalty=1.8
    )
    assert plain_rep.text != penalised.text
    # min_p with greedy is greedy; the field is accepted and passed.
    assert (await _complete(engine_app, max_tokens=12, min_p=0.5))["choices"][0]["text"] == greedy[
        "text"
    ]
    # A string stop names itself in stop_reason.
    word = greedy["text"].split()[1]
    stopped = (await _complete(engine_app, max_tokens=12, stop=[word]))["choices"][0]
    assert stopped["stop_reason"] == word


@pytest.mark.slow
async def test_structured_outputs_follow_the_schema(engine_app: httpx.AsyncClient) -> None:
    schema = {
        "type": "object",
        "properties": {"year": {"type": "integer"}},
        "required": ["year"],
        "additionalProperties": False,
    }
    body = await _complete(
        engine_app,
        max_tokens=20,
        response_format={"type": "json_schema", "json_schema": {"name": "y", "schema": schema}},
    )
    value = json.loads(body["choices"][0]["text"])
    assert set(value) == {"year"} and isinstance(value["year"], int)
    choice = await _complete(engine_app, max_tokens=5, structured_outputs={"choice": ["yes", "no"]})
    assert choice["choices"][0]["text"] in ("yes", "no")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "opened",
                "parameters": {
                    "type": "object",
                    "properties": {"year": {"type": "integer"}},
                    "required": ["year"],
                },
            },
        }
    ]
    chat = await engine_app.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "When did the railway open? 1887."}],
            "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "opened"}},
            "max_tokens": 20,
            "temperature": 0,
        },
    )
    assert chat.status_code == 200, chat.text
    call = chat.json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "opened"
    assert isinstance(json.loads(call["function"]["arguments"])["year"], int)


@pytest.mark.slow
async def test_forced_tool_choices_stream_as_tool_call_deltas(
    engine_app: httpx.AsyncClient,
) -> None:
    """A named function and "required" stream their calls as vLLM streams them: the first
    delta of a call carries its id and name, later ones only argument text, and the pieces
    join to what the whole answer holds."""
    parameters = {
        "type": "object",
        "properties": {"year": {"type": "integer"}},
        "required": ["year"],
        "additionalProperties": False,
    }
    body = {
        "messages": [{"role": "user", "content": "When did the railway open? 1887."}],
        "tools": [{"type": "function", "function": {"name": "opened", "parameters": parameters}}],
        "max_tokens": 60,
        "temperature": 0,
    }
    for choice in ({"type": "function", "function": {"name": "opened"}}, "required"):
        whole = await engine_app.post("/v1/chat/completions", json={**body, "tool_choice": choice})
        assert whole.status_code == 200, whole.text
        expected = whole.json()["choices"][0]
        chunks = await _stream_chunks(
            engine_app, {**body, "tool_choice": choice}, "/v1/chat/completions"
        )
        calls: dict[int, list[dict[str, Any]]] = {}
        for chunk in chunks:
            for delta in chunk["choices"][0]["delta"].get("tool_calls", []):
                calls.setdefault(delta["index"], []).append(delta)
        assert 0 in calls, chunks
        for pieces in calls.values():
            assert pieces[0]["function"]["name"] == "opened" and pieces[0]["id"]
            assert all("id" not in d and "name" not in d["function"] for d in pieces[1:])
        first = json.loads("".join(d["function"]["arguments"] for d in calls[0]))
        assert isinstance(first["year"], int)
        message = expected["message"]
        if "tool_calls" in message:
            whole_first = json.loads(message["tool_calls"][0]["function"]["arguments"])
        else:  # "required" cut short by max_tokens (this model repeats the call): the text
            whole_first = json.JSONDecoder().raw_decode(message["content"], 1)[0]["parameters"]
        assert first == whole_first
        assert chunks[-1]["choices"][0]["finish_reason"] == expected["finish_reason"]


@pytest.mark.slow
async def test_prompt_forms_batches_token_ids_and_echo_logprobs(
    engine_app: httpx.AsyncClient, vllm_engine: Any, decoder_parts: DecoderParts
) -> None:
    tok = decoder_parts.tokenizer
    ids = tok.encode(PROMPT)
    text_answer = (await _complete(engine_app, max_tokens=6))["choices"][0]["text"]
    by_ids = (await _complete(engine_app, prompt=ids, max_tokens=6))["choices"][0]["text"]
    assert by_ids == text_answer
    batch = await _complete(engine_app, prompt=[PROMPT, "Paris is the capital of"], max_tokens=6)
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert batch["choices"][0]["text"] == text_answer
    assert batch["usage"]["prompt_tokens"] == len(ids) + len(tok.encode("Paris is the capital of"))
    id_batch = await _complete(
        engine_app, prompt=[ids, ids[:5]], max_tokens=2, n=2, seed=1, temperature=0.8
    )
    assert [c["index"] for c in id_batch["choices"]] == [0, 1, 2, 3]

    # echo with logprobs: the prompt's logprobs, as vLLM's prompt_logprobs give them.
    echo = await _complete(engine_app, max_tokens=1, logprobs=1, echo=True)
    choice = echo["choices"][0]
    assert choice["text"].startswith(PROMPT)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    from vllm import SamplingParams

    ref = None
    async for out in vllm_engine.generate(
        {"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1), "echo-ref"
    ):
        ref = out
    expected = [None] + [
        d[t].logprob for t, d in zip(ids[1:], ref.prompt_logprobs[1:], strict=True)
    ]
    assert lp["token_logprobs"][: len(ids)] == pytest.approx(expected, abs=1e-4)
    assert lp["text_offset"][1] == len(lp["tokens"][0])
    only = await _complete(engine_app, max_tokens=0, logprobs=0, echo=True)
    assert only["choices"][0]["text"] == PROMPT
    assert len(only["choices"][0]["logprobs"]["tokens"]) == len(ids)


async def _stream_chunks(
    http: httpx.AsyncClient, body: dict[str, Any], path: str = "/v1/completions"
) -> list[dict[str, Any]]:
    out = []
    async with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


@pytest.mark.slow
async def test_streams_carry_usage_when_asked(engine_app: httpx.AsyncClient) -> None:
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    without = await _stream_chunks(engine_app, body)
    assert all("usage" not in c for c in without)
    with_usage = await _stream_chunks(
        engine_app, {**body, "stream_options": {"include_usage": True}}
    )
    last = with_usage[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    assert "".join(c["choices"][0]["text"] for c in with_usage[:-1]) == "".join(
        c["choices"][0]["text"] for c in without
    )
    assert with_usage[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
async def test_metrics_carry_vllms_series_and_the_flag_reached_the_engine(
    engine_app: httpx.AsyncClient, vllm_engine: Any
) -> None:
    from tests.fixtures.engine import ENGINE_ARGV

    assert vllm_engine.vllm_config.scheduler_config.max_num_seqs == int(ENGINE_ARGV[1])
    long_prompt = PROMPT * 12  # over one KV block (128 tokens on the CPU backend)
    await _complete(engine_app, prompt=long_prompt, max_tokens=4)
    before = await _prefix_hits(engine_app)
    await _complete(engine_app, prompt=long_prompt, max_tokens=4)  # prefix-cache hits
    assert await _prefix_hits(engine_app) >= before + 128
    text = (await engine_app.get("/metrics")).text
    for series in (
        "vllm:num_requests_running{",
        "vllm:num_requests_waiting{",
        "vllm:kv_cache_usage_perc{",
        "vllm:prompt_tokens_total{",
        "vllm:generation_tokens_total{",
        "vllm:time_to_first_token_seconds_bucket{",
        "vllm:inter_token_latency_seconds_bucket{",
        "vllm:prefix_cache_hits_total{",
        "vllm:prefix_cache_queries_total{",
        "http_requests_total{",
        "deliberate_requests_total{",
    ):
        assert series in text, series
    model = vllm_engine.model_config.served_model_name
    assert f'vllm:prompt_tokens_total{{engine="0",model_name="{model}"}}' in text


async def _prefix_hits(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("vllm:prefix_cache_hits_total{")
    )


@pytest.mark.slow
async def test_repeated_hits_reuse_vllms_prefix_cache(
    decoder_parts: DecoderParts, vllm_engine: Any
) -> None:
    """An augmented prompt (embeddings) sent again reuses the KV blocks of the first: vLLM
    hashes prompt embeddings per block. Read from vLLM's own counters, not a timing."""
    import torch

    from cache_store import encode_payload

    store = open_store(None, registry=CollectorRegistry())
    state = make_state(decoder_parts, store, engine=vllm_engine, engine_registry=REGISTRY)
    body = {"context": PROMPT * 12, "prompt": " Question: when?", "max_tokens": 2,
            "temperature": 0}  # fmt: skip
    n_latents, hidden = decoder_parts.checkpoint.n_latents, decoder_parts.embeddings.hidden_size
    async with serving(state) as base, httpx.AsyncClient(base_url=base, timeout=300) as http:
        miss = (await http.post("/v1/completions", json=body)).json()
        assert miss["augmentation"]["status"] == "miss-enqueued"
        [delivery] = await store.claim_jobs("w", 1, 1.0)
        latents = torch.randn(n_latents, hidden, generator=torch.Generator().manual_seed(0))
        await store.publish(
            delivery,
            encode_payload(
                latents * 0.1,
                key=delivery.job.key,
                decoder_fp=delivery.job.decoder_fp,
                coprocessor_fp=delivery.job.coprocessor_fp,
                prefix_len=delivery.job.prefix_len,
            ),
        )
        first = (await http.post("/v1/completions", json=body)).json()
        assert first["augmentation"]["status"] == "hit"
        before = await _prefix_hits(http)
        second = (await http.post("/v1/completions", json=body)).json()
        assert second["augmentation"]["status"] == "hit"
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        assert await _prefix_hits(http) >= before + 128  # at least one whole block reused
    await store.close()
