"""POST /v1/chat/completions: every message before the last user message (or the first
`context_messages`) is the context that is augmented.

Tools are rendered into the chat template, as vLLM does. A named `tool_choice` and
`"required"` are decoded under a JSON schema (vLLM's structured outputs) and answered as
`tool_calls`, as vLLM answers them; `"auto"` needs a model-specific tool-call parser, which
this server does not have, and is refused as vLLM refuses it without
`--enable-auto-tool-choice`."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi.responses import Response
from vllm.outputs import RequestOutput

from server.errors import ApiError
from server.generation import Renderer, check_model, serve
from server.prompts import ChatOptions, split_chat
from server.protocol import ChatCompletionRequest, NamedToolChoice
from server.state import Caller, ServerState, off_loop


def chat_options(state: ServerState, body: Any) -> ChatOptions:
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    return ChatOptions(
        tools=tools, chat_template=state.chat_template, kwargs=body.chat_template_kwargs
    )


def tool_schema(body: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema a tool choice decodes under (vLLM's, for named and required)."""
    choice = body.effective_tool_choice()
    if choice == "none":
        return None
    if choice == "auto":
        raise ApiError(
            400,
            'tool_choice "auto" needs a tool-call parser for the model, which this server does '
            'not have (vLLM: --enable-auto-tool-choice --tool-call-parser); use "none", '
            '"required" or a named function',
            param="tool_choice",
        )
    if body.stream:
        raise ApiError(
            400, "tool_choice other than 'none' is not supported with stream", param="tool_choice"
        )
    tools = {t.function.name: t.function for t in body.tools or []}
    if isinstance(choice, NamedToolChoice):
        return tools[choice.function.name].parameters or {"type": "object"}
    return {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [name]},
                        "parameters": fn.parameters or {"type": "object"},
                    },
                    "required": ["name", "parameters"],
                }
                for name, fn in tools.items()
            ]
        },
    }


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, caller: Caller
) -> Response:
    check_model(state, body)
    tenant = caller.tenant_for(body.tenant)
    schema = tool_schema(body)
    try:
        parts = await off_loop(
            state,
            split_chat,
            state.tokenizer,
            body.messages,
            body.context_messages,
            chat_options(state, body),
        )
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    return await serve(
        state,
        body,
        [parts],
        tenant,
        chat=True,
        default_max_tokens=body.max_completion_tokens,
        render=ChatRenderer,
        tool_schema=schema,
    )


def _tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


class ChatRenderer(Renderer):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"
    body: ChatCompletionRequest

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
        message: dict[str, Any] = {"role": "assistant", "content": completion.text}
        finish_reason = completion.finish_reason
        if final:
            message, finish_reason = self._tool_calls(message, completion)
        return {
            "index": index,
            ("message" if final else "delta"): message,
            "logprobs": self._logprobs(completion),
            "finish_reason": finish_reason,
            "stop_reason": completion.stop_reason,
        }

    def _tool_calls(self, message: dict[str, Any], completion: Any) -> tuple[dict[str, Any], Any]:
        choice = self.body.effective_tool_choice()
        if isinstance(choice, NamedToolChoice):
            call = _tool_call(choice.function.name, completion.text)
            return {"role": "assistant", "content": None, "tool_calls": [call]}, (
                completion.finish_reason
            )
        if choice == "required":
            try:
                calls = [
                    _tool_call(c["name"], json.dumps(c["parameters"]))
                    for c in json.loads(completion.text)
                ]
            except (ValueError, KeyError, TypeError):
                return message, completion.finish_reason  # cut short: the text as it is
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        return message, completion.finish_reason

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
