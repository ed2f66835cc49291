"""POST /tokenize and /detokenize, as vLLM serves them (same bodies and answers)."""

from __future__ import annotations

from typing import Any

from server.errors import ApiError
from server.generation import check_model
from server.prompts import render_chat
from server.protocol import DetokenizeRequest, TokenizeRequest
from server.serving_chat import chat_options
from server.state import ServerState, off_loop


def _tokenize(state: ServerState, body: TokenizeRequest) -> list[int]:
    if body.messages is not None:
        text = render_chat(
            state.tokenizer, body.messages, chat_options(state, body), body.add_generation_prompt
        )
        # The template writes the special tokens itself, as for a chat completion.
        return state.tokenizer.encode(text, add_special_tokens=False)
    assert body.prompt is not None
    return state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)


async def tokenize(state: ServerState, body: TokenizeRequest) -> dict[str, Any]:
    check_model(state, body)
    try:
        tokens = await off_loop(state, _tokenize, state, body)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    answer: dict[str, Any] = {
        "count": len(tokens),
        "max_model_len": state.max_model_len,
        "tokens": tokens,
        "token_strs": None,
    }
    if body.return_token_strs:
        convert = getattr(state.tokenizer, "convert_ids_to_tokens", None)
        strs = convert(tokens) if convert else [state.tokenizer.decode([t]) for t in tokens]
        answer["token_strs"] = strs
    return answer


async def detokenize(state: ServerState, body: DetokenizeRequest) -> dict[str, Any]:
    check_model(state, body)
    vocab = state.vocab_size
    if vocab and body.tokens and max(body.tokens) >= vocab:
        raise ApiError(
            400,
            f"tokens: token id {max(body.tokens)} is outside the vocabulary (size {vocab})",
            param="tokens",
        )
    text = await off_loop(state, state.tokenizer.decode, body.tokens)
    return {"prompt": text}
