"""The generation path both endpoints share: limits, the augmentation plan, vLLM's sampling
parameters, the call into the engine and the response envelope."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from vllm import SamplingParams
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind

from server.augmentation import Plan
from server.errors import ApiError
from server.prompts import PromptParts, Tokenizer
from server.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from server.state import ServerState, cache_salt

STATUS_HEADER = "X-Deliberate-Augmentation"
KEY_HEADER = "X-Deliberate-Key"


def check_model(state: ServerState, body: GenerationRequest) -> None:
    if body.model != state.model_name:
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


async def serve(
    state: ServerState,
    body: CompletionRequest | ChatCompletionRequest,
    parts: PromptParts,
    tenant: str,
    *,
    chat: bool,
    default_max_tokens: int | None,
    render: type[Renderer],
) -> Response:
    arrived = time.perf_counter()
    check_context_length(state, parts.context_ids)
    plan = await state.augmenter.plan(
        parts.context_ids,
        parts.rest_ids,
        tenant=tenant,
        augment=body.augment,
        wait_s=body.augment_wait_seconds,
    )
    prompt_len = plan.prompt_tokens + plan.n_latents
    room = state.max_model_len - prompt_len
    if room < 1:
        raise ApiError(
            400,
            f"prompt ({prompt_len} positions) leaves no room to generate within the "
            f"model's context of {state.max_model_len}",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
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
    # Per-tenant salt on every prompt (tokens or embeddings): vLLM's prefix cache is shared
    # by all requests, and a cache hit shows in the time to first token.
    prompt = {**plan.prompt, "cache_salt": cache_salt(tenant)}
    outputs = _timed(state, plan, arrived, state.engine.generate(prompt, params, request_id))
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


class Renderer:
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
