"""The generation path both endpoints share: limits, the augmentation plan, vLLM's sampling
parameters, the call into the engine and the response envelope (bodies and stream chunks).

A completion may carry a batch of prompts: each is planned (looked up, augmented or not) and
generated on its own, concurrently, and the choices are numbered prompt by prompt as vLLM
numbers them (`index = prompt * n + choice`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from server.augmentation import Plan
from server.errors import ApiError
from server.prompts import PromptParts, Tokenizer
from server.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from server.state import ServerState, cache_salt

STATUS_HEADER = "X-Deliberate-Augmentation"
KEY_HEADER = "X-Deliberate-Key"
CLIENT_CLOSED = 499
"""The status recorded (never sent) for a request whose client went away, as nginx's."""


async def unless_disconnected(
    request: Request,
    handler: Coroutine[Any, Any, Response],
    on_disconnect: Callable[[], None],
) -> Response:
    """The handler's response, or, if the client disconnects first, the handler cancelled:
    its engine requests are aborted (vLLM's AsyncLLM.generate aborts when cancelled), so a
    client that gave up does not keep a sequence decoding until max_tokens. As vLLM's
    `with_cancellation`. A stream, once returned, watches for the disconnect itself."""
    work = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()  # this request is being cancelled (shutdown past its bound): it too
        raise
    finally:
        watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work  # the abort happens as the cancellation unwinds the engine's generator
    on_disconnect()
    return Response(status_code=CLIENT_CLOSED)


async def _disconnected(request: Request) -> None:
    # The body was read before the handler ran, so only the disconnect is left to receive.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_model(state: ServerState, body: GenerationRequest | Any) -> None:
    """`model` may be absent (the served model, as in vLLM) or any served name."""
    if body.model is not None and body.model not in state.served_names():
        raise ApiError(
            404,
            f"model '{body.model}' is not served here; GET /v1/models lists '{state.model_name}'",
            param="model",
            code="model_not_found",
        )


def check_context_length(state: ServerState, context_ids: list[int]) -> None:
    if len(context_ids) > state.max_context_tokens:
        raise ApiError(
            400,
            f"context is {len(context_ids)} tokens; this server accepts at most "
            f"{state.max_context_tokens}",
            param="context",
            code="context_too_long",
        )


def structured_outputs(
    body: GenerationRequest, tool_schema: dict[str, Any] | None = None
) -> StructuredOutputsParams | None:
    """vLLM's guided decoding from `response_format`, `structured_outputs` or a tool choice
    (at most one of them)."""
    given: list[tuple[str, dict[str, Any]]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        assert fmt.json_schema is not None
        given.append(("response_format", {"json": fmt.json_schema.json_schema}))
    if body.structured_outputs is not None:
        fields = body.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        if len(fields) != 1:
            raise ApiError(
                400,
                "structured_outputs: give exactly one of json, regex, choice, grammar, json_object",
                param="structured_outputs",
            )
        given.append(("structured_outputs", fields))
    if tool_schema is not None:
        given.append(("tool_choice", {"json": tool_schema}))
    if len(given) > 1:
        names = " and ".join(name for name, _ in given)
        raise ApiError(400, f"{names} cannot be combined", param=given[1][0])
    if not given:
        return None
    try:
        return StructuredOutputsParams(**given[0][1])
    except ValueError as exc:
        raise ApiError(400, f"{given[0][0]}: {exc}", param=given[0][0]) from exc


# OpenAI's defaults, where neither the request nor the model's generation_config sets one.
_SAMPLING_DEFAULTS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def sampling_params(
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    *,
    structured: StructuredOutputsParams | None,
    defaults: Mapping[str, Any] | None = None,
) -> SamplingParams:
    """Priority as in vLLM: the request, then the model's generation_config, then OpenAI's."""
    chosen = {
        name: value
        if (value := getattr(body, name)) is not None
        else (defaults or {}).get(name, default)
        for name, default in _SAMPLING_DEFAULTS.items()
    }
    prompt_logprobs = None
    if isinstance(body, ChatCompletionRequest):
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
        if body.echo and body.logprobs is not None:
            prompt_logprobs = body.logprobs
    try:
        return SamplingParams(
            n=body.n,
            **chosen,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=body.stop,
            stop_token_ids=body.stop_token_ids,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens,
            spaces_between_special_tokens=body.spaces_between_special_tokens,
            logit_bias={int(t): b for t, b in body.logit_bias.items()} if body.logit_bias else None,
            allowed_token_ids=body.allowed_token_ids,
            bad_words=body.bad_words,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY,
        )
    except (ValueError, VLLMClientError) as exc:  # vLLM's own checks of the values
        raise _client_error(exc) from exc


def _client_error(exc: ValueError | VLLMClientError) -> ApiError:
    # vLLM 0.32's VLLMValidationError ("The decoder prompt cannot be empty", ...) is a
    # VLLMClientError, not a ValueError: both are the client's mistake.
    return ApiError(400, str(exc), param=getattr(exc, "parameter", None))


@dataclass
class Prepared:
    """One prompt of the request, planned and ready for the engine."""

    parts: PromptParts
    plan: Plan
    params: SamplingParams


async def serve(
    state: ServerState,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: Sequence[PromptParts],
    tenant: str,
    *,
    chat: bool,
    default_max_tokens: int | None,
    render: Callable[..., Renderer],
    tool_schema: dict[str, Any] | None = None,
) -> Response:
    arrived = time.perf_counter()
    structured = structured_outputs(body, tool_schema)
    echo_only = isinstance(body, CompletionRequest) and body.echo and body.max_tokens == 0
    prepared = []
    for parts in prompts:
        check_context_length(state, parts.context_ids)
        plan = await state.augmenter.plan(
            parts.context_ids,
            parts.rest_ids,
            tenant=tenant,
            augment=body.augment,
            wait_s=body.augment_wait_seconds,
        )
        max_tokens = _max_tokens(state, body, plan, default_max_tokens, chat, echo_only)
        prepared.append(
            Prepared(
                parts,
                plan,
                sampling_params(
                    body, max_tokens, structured=structured, defaults=state.default_sampling
                ),
            )
        )
    endpoint = "chat" if chat else "completions"
    for p in prepared:
        state.metrics.requests.labels(endpoint=endpoint, status=p.plan.status.value).inc()
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    first = prepared[0].plan
    headers = {STATUS_HEADER: first.status.value}
    if first.key:
        headers[KEY_HEADER] = first.key
    generators = []
    for i, p in enumerate(prepared):
        # Per-tenant salt on every prompt (tokens or embeddings): vLLM's prefix cache is
        # shared by all requests, and a cache hit shows in the time to first token.
        prompt = {**p.plan.prompt, "cache_salt": cache_salt(tenant)}
        rid = request_id if len(prepared) == 1 else f"{request_id}-{i}"
        generators.append(
            _timed(state, p.plan, arrived, state.engine.generate(prompt, p.params, rid))
        )
    streams = await _all_started(generators)
    renderer = render(request_id, state.model_name, prepared, state.tokenizer, body)
    if body.stream:
        return EventSourceResponse(renderer.stream(_merged(streams)), headers=headers)
    finals = await asyncio.gather(*(_last(s) for s in streams))
    return JSONResponse(renderer.whole(finals), headers=headers)


def _max_tokens(
    state: ServerState,
    body: CompletionRequest | ChatCompletionRequest,
    plan: Plan,
    default_max_tokens: int | None,
    chat: bool,
    echo_only: bool,
) -> int:
    prompt_len = plan.prompt_tokens + plan.added_positions
    room = state.max_model_len - prompt_len
    if room < 1:
        raise ApiError(
            400,
            f"prompt ({prompt_len} positions) leaves no room to generate within the "
            f"model's context of {state.max_model_len}",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    if echo_only:
        return 1  # as vLLM: one token is generated and dropped
    max_tokens = body.max_tokens or default_max_tokens or room
    if max_tokens > room:
        raise ApiError(
            400,
            f"prompt ({prompt_len} positions) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {state.max_model_len}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


async def _started(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Wait for the first output, so that what vLLM refuses while adding the request (a
    token id outside the vocabulary, a schema it cannot compile) is a 400, not a broken
    stream or a 500."""
    try:
        first = await anext(outputs)
    except (ValueError, VLLMClientError) as exc:
        raise _client_error(exc) from exc

    async def chained() -> AsyncIterator[RequestOutput]:
        yield first
        async for output in outputs:
            yield output

    return chained()


async def _all_started(
    generators: list[AsyncIterator[RequestOutput]],
) -> list[AsyncIterator[RequestOutput]]:
    """Every prompt of a batch added to the engine at once (not one after another's first
    token); if vLLM refuses one, the others are closed (aborted) and the refusal raised."""
    if len(generators) == 1:
        return [await _started(generators[0])]
    started = await asyncio.gather(*(_started(g) for g in generators), return_exceptions=True)
    failed = [s for s in started if isinstance(s, BaseException)]
    if failed:
        for s in started:
            if not isinstance(s, BaseException):
                await s.aclose()  # type: ignore[attr-defined]
        raise failed[0]
    return started  # type: ignore[return-value]


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    final: RequestOutput | None = None
    async for output in outputs:
        final = output
    assert final is not None, "vLLM finished a request without output"
    return final


async def _merged(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of every prompt of a batch as they come, tagged with the prompt's index."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((i, output))
            await queue.put((i, None))
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()  # a client gone mid-stream: vLLM aborts the cancelled requests


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


class Renderer:
    """Turns vLLM outputs into OpenAI response bodies and stream chunks."""

    object_whole: str
    object_chunk: str

    def __init__(
        self,
        request_id: str,
        model: str,
        prepared: Sequence[Prepared],
        tokenizer: Tokenizer,
        body: CompletionRequest | ChatCompletionRequest,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.prepared = prepared
        self.tokenizer = tokenizer
        self.body = body
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def _augmentation(self) -> dict[str, Any]:
        return self.prepared[0].plan.describe()

    def _extra(self) -> dict[str, Any]:
        """What a batch adds: every prompt's augmentation."""
        if len(self.prepared) == 1:
            return {"augmentation": self._augmentation()}
        return {
            "augmentation": self._augmentation(),
            "augmentations": [p.plan.describe() for p in self.prepared],
        }

    @property
    def prompt_tokens(self) -> int:
        return sum(p.plan.prompt_tokens for p in self.prepared)

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def whole(self, finals: Sequence[RequestOutput]) -> dict[str, Any]:
        choices = []
        completion_tokens = 0
        for i, output in enumerate(finals):
            for c in output.outputs:
                choices.append(
                    self.choice(i * self.body.n + c.index, i, output, c, final=True, first=True)
                )
                completion_tokens += len(c.token_ids)
        return {
            **self._envelope(self.object_whole),
            "choices": choices,
            "usage": self._usage(completion_tokens),
            **self._extra(),
        }

    async def stream(
        self, outputs: AsyncIterator[tuple[int, RequestOutput]]
    ) -> AsyncIterator[dict[str, str]]:
        first_chunk = True
        seen: set[int] = set()
        completion_tokens = 0
        async for i, output in outputs:
            for completion in output.outputs:
                index = i * self.body.n + completion.index
                completion_tokens += len(completion.token_ids)
                chunk = {
                    **self._envelope(self.object_chunk),
                    "choices": [
                        self.choice(
                            index, i, output, completion, final=False, first=index not in seen
                        )
                    ],
                }
                seen.add(index)
                if first_chunk:
                    chunk.update(self._extra())
                    first_chunk = False
                if self.body.continuous_usage:
                    chunk["usage"] = self._usage(completion_tokens)
                yield {"data": json.dumps(chunk)}
        if self.body.include_usage:
            last = {
                **self._envelope(self.object_chunk),
                "choices": [],
                "usage": self._usage(completion_tokens),
            }
            yield {"data": json.dumps(last)}
        yield {"data": "[DONE]"}

    def choice(
        self,
        index: int,
        prompt_index: int,
        output: RequestOutput,
        completion: Any,
        *,
        final: bool,
        first: bool,
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _token_text(self, token_id: int, logprob: Any) -> str:
        text = getattr(logprob, "decoded_token", None)
        return text if text is not None else self.tokenizer.decode([token_id])
