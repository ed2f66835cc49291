"""tool_choice "auto" through vLLM's own tool-call parsers (`--enable-auto-tool-choice
--tool-call-parser`), answered as `vllm serve` answers it.

SmolLM2-135M does not call tools of its own accord, so no test waits for it to: the parser's
extraction is tested on literal model outputs, and the real engine is made to write a tool
call by constraining its output to one (structured outputs)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from vllm.outputs import CompletionOutput
from vllm.tool_parsers import ToolParserManager

from cache_store import open_store
from tests.fixtures.app_server import DecoderParts, make_state, serving

HERMES = ToolParserManager.get_tool_parser("hermes")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def _settings(*flags: str) -> Any:
    from deliberate.cli import build_parser
    from deliberate.commands import settings_from_args

    return settings_from_args(build_parser().parse_args(["serve", *flags]))


def test_the_flags_select_vllms_parser(decoder_parts: DecoderParts) -> None:
    from deliberate.serving import auto_tool_parser

    tokenizer = decoder_parts.tokenizer
    on = _settings("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    assert auto_tool_parser(on, tokenizer) is HERMES
    assert auto_tool_parser(_settings(), tokenizer) is None
    # As `vllm serve`: the parser alone is accepted, and "auto" stays off.
    assert auto_tool_parser(_settings("--tool-call-parser", "hermes"), tokenizer) is None
    with pytest.raises(ValidationError, match="--enable-auto-tool-choice requires"):
        _settings("--enable-auto-tool-choice")
    unknown = _settings("--enable-auto-tool-choice", "--tool-call-parser", "nope")
    with pytest.raises(ValueError, match=r"'nope': vLLM has no such parser.*hermes"):
        auto_tool_parser(unknown, tokenizer)


@pytest.fixture
async def no_parser_app(decoder_parts: DecoderParts) -> AsyncIterator[httpx.AsyncClient]:
    store = open_store(None, registry=CollectorRegistry())
    state = make_state(decoder_parts, store)
    async with serving(state) as base, httpx.AsyncClient(base_url=base, timeout=60) as http:
        yield http
    await store.close()


@pytest.mark.parametrize("choice", [None, "auto"])
async def test_auto_without_the_flag_is_refused_naming_it(
    no_parser_app: httpx.AsyncClient, choice: str | None
) -> None:
    body: dict[str, Any] = {"messages": MESSAGES, "tools": TOOLS}
    if choice is not None:
        body["tool_choice"] = choice  # absent: "auto", as vLLM defaults with tools
    response = await no_parser_app.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in error["message"]
    assert "--tool-call-parser" in error["message"]


def _renderer(decoder_parts: DecoderParts, **fields: Any) -> Any:
    from server.protocol import ChatCompletionRequest
    from server.serving_chat import ChatRenderer, auto_tools

    store = open_store(None, registry=CollectorRegistry())
    state = make_state(decoder_parts, store, tool_parser=HERMES)
    body = ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": TOOLS, **fields})
    tools = auto_tools(state, body)
    assert tools is not None
    body = tools.adjust(body)
    return ChatRenderer("id", "smollm2", [], decoder_parts.tokenizer, body, auto_tools=tools)


def _output(text: str, token_ids: list[int], finish_reason: str | None) -> CompletionOutput:
    return CompletionOutput(
        index=0,
        text=text,
        token_ids=token_ids,
        cumulative_logprob=None,
        logprobs=None,
        finish_reason=finish_reason,
    )


def test_the_parser_extracts_calls_from_a_whole_output(decoder_parts: DecoderParts) -> None:
    renderer = _renderer(decoder_parts, spaces_between_special_tokens=False)
    # Hermes' tags are special tokens in the models it is for: the parser keeps them, and
    # leaves what it does not adjust as the request asked.
    assert renderer.body.skip_special_tokens is False
    assert renderer.body.spaces_between_special_tokens is False
    called = renderer.choice(
        0, 0, None, _output("Let me look. " + CALL, [], "stop"), final=True, first=True
    )
    assert called["finish_reason"] == "tool_calls"
    message = called["message"]
    assert message["content"] == "Let me look. "
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    plain = renderer.choice(0, 0, None, _output("Sunny.", [], "stop"), final=True, first=True)
    assert plain["message"] == {"role": "assistant", "content": "Sunny."}
    assert plain["finish_reason"] == "stop"


def test_streamed_deltas_assemble_to_the_call(decoder_parts: DecoderParts) -> None:
    tokenizer = decoder_parts.tokenizer
    renderer = _renderer(decoder_parts, stream=True)
    ids = tokenizer.encode("Let me look. " + CALL, add_special_tokens=False)
    chunks, text = [], ""
    for n in range(1, len(ids) + 1):
        upto = tokenizer.decode(ids[:n])
        finish = "stop" if n == len(ids) else None
        delta = _output(upto[len(text) :], ids[n - 1 : n], finish)
        chunks.append(renderer.choice(0, 0, None, delta, final=False, first=n == 1))
        text = upto
    content = "".join(c["delta"]["content"] or "" for c in chunks)
    calls = [tc for c in chunks for tc in c["delta"].get("tool_calls", [])]
    assert content == "Let me look. "
    assert [tc["function"]["name"] for tc in calls if "name" in tc["function"]] == ["get_weather"]
    arguments = "".join(tc["function"].get("arguments", "") for tc in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    assert {tc["index"] for tc in calls} == {0}
    assert [c["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["finish_reason"] == "tool_calls"


# --- the real engine -------------------------------------------------------------------------


async def _stream(http: httpx.AsyncClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


@pytest.mark.slow
async def test_auto_on_the_real_engine(decoder_parts: DecoderParts, vllm_engine: Any) -> None:
    from deliberate.serving import auto_tool_parser

    body: dict[str, Any] = {
        "messages": MESSAGES,
        "tools": TOOLS,
        "tool_choice": "auto",
        "max_tokens": 40,
        "temperature": 0,
    }
    store = open_store(None, registry=CollectorRegistry())
    plain = make_state(decoder_parts, store, engine=vllm_engine)
    async with serving(plain) as base, httpx.AsyncClient(base_url=base, timeout=300) as http:
        refused = await http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400
        assert "--enable-auto-tool-choice" in refused.json()["error"]["message"]
    await store.close()

    flags = _settings("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    parser = auto_tool_parser(flags, decoder_parts.tokenizer)
    store = open_store(None, registry=CollectorRegistry())
    state = make_state(decoder_parts, store, engine=vllm_engine, tool_parser=parser)
    async with serving(state) as base, httpx.AsyncClient(base_url=base, timeout=300) as http:
        free = await http.post("/v1/chat/completions", json=body)
        assert free.status_code == 200, free.text
        [choice] = free.json()["choices"]
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length", "tool_calls")
        assert choice["message"]["content"] or choice["message"].get("tool_calls")

        # The model's output forced to one Hermes tool call: what the parser answers.
        forced = {**body, "max_tokens": 60, "structured_outputs": {"choice": [CALL]}}
        whole = await http.post("/v1/chat/completions", json=forced)
        assert whole.status_code == 200, whole.text
        [choice] = whole.json()["choices"]
        assert choice["finish_reason"] == "tool_calls"
        [call] = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

        chunks = await _stream(http, {**forced, "stream": True})
        deltas = [c["choices"][0]["delta"] for c in chunks]
        calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
        assert [tc["function"]["name"] for tc in calls if "name" in tc["function"]] == [
            "get_weather"
        ]
        arguments = "".join(tc["function"].get("arguments", "") for tc in calls)
        assert json.loads(arguments) == {"city": "Paris"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    await store.close()
