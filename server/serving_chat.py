"""POST /v1/chat/completions: every message before the last user message (or the first
`context_messages`) is the context that is augmented."""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response

from server.errors import ApiError
from server.generation import Renderer, check_model, serve
from server.prompts import split_chat
from server.protocol import ChatCompletionRequest
from server.state import Caller, ServerState, off_loop


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, caller: Caller
) -> Response:
    check_model(state, body)
    tenant = caller.tenant_for(body.tenant)
    try:
        parts = await off_loop(
            state, split_chat, state.tokenizer, body.messages, body.context_messages
        )
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    return await serve(
        state,
        body,
        parts,
        tenant,
        chat=True,
        default_max_tokens=body.max_completion_tokens,
        render=ChatRenderer,
    )


class ChatRenderer(Renderer):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def choice(self, index: int, completion: Any, *, final: bool) -> dict[str, Any]:
        message = {"role": "assistant", "content": completion.text}
        return {
            "index": index,
            ("message" if final else "delta"): message,
            "logprobs": self._logprobs(completion),
            "finish_reason": completion.finish_reason,
        }

    def _logprobs(self, completion: Any) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None
        content = []
        for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=True):
            chosen = candidates[token_id]
            content.append(
                {
                    "token": self._token_text(token_id, chosen),
                    "logprob": chosen.logprob,
                    "bytes": None,
                    "top_logprobs": [
                        {"token": self._token_text(t, lp), "logprob": lp.logprob, "bytes": None}
                        for t, lp in sorted(candidates.items(), key=lambda c: c[1].rank)
                    ],
                }
            )
        return {"content": content}
