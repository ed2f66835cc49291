"""POST /v1/completions: text before `prompt` (`context`) is the part that is augmented."""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response

from server.errors import ApiError
from server.generation import Renderer, check_model, serve
from server.prompts import split_completion
from server.protocol import CompletionRequest
from server.state import Caller, ServerState, off_loop


async def create_completion(
    state: ServerState, body: CompletionRequest, caller: Caller
) -> Response:
    check_model(state, body)
    tenant = caller.tenant_for(body.tenant)
    try:
        prompt_text = body.prompt_text()
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from exc
    parts = await off_loop(state, split_completion, state.tokenizer, body.context, prompt_text)
    return await serve(
        state, body, parts, tenant, chat=False, default_max_tokens=16, render=CompletionRenderer
    )


class CompletionRenderer(Renderer):
    object_whole = "text_completion"
    object_chunk = "text_completion"

    def choice(self, index: int, completion: Any, *, final: bool) -> dict[str, Any]:
        return {
            "index": index,
            "text": completion.text,
            "logprobs": self._logprobs(completion),
            "finish_reason": completion.finish_reason,
        }

    def _logprobs(self, completion: Any) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None
        tokens, token_logprobs, top = [], [], []
        for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=True):
            chosen = candidates[token_id]
            tokens.append(self._token_text(token_id, chosen))
            token_logprobs.append(chosen.logprob)
            top.append({self._token_text(t, lp): lp.logprob for t, lp in candidates.items()})
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": [],
        }
