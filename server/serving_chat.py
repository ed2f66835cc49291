"""POST /v1/chat/completions: every message before the last user message (or the first
`context_messages`) is the context that is augmented.

Tools are rendered into the chat template, as vLLM does. A named `tool_choice` and
`"required"` are decoded under a JSON schema (vLLM's structured outputs) and answered as
`tool_calls`, whole or streamed as deltas by vLLM's own streaming helpers, as vLLM answers
them. `"auto"` (the default when tools are given) lets the
model answer in text or call tools in its own format, which vLLM's tool-call parser for that
format (`--tool-call-parser`, with `--enable-auto-tool-choice`) turns into `tool_calls`, whole
or streamed as deltas; without those flags it is refused, as vLLM refuses it."""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as VllmChatRequest,
)
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.tool_parsers import ToolParser, ToolParserManager
from vllm.tool_parsers.streaming import (
    extract_named_tool_call_streaming,
    extract_required_tool_call_streaming,
)

from server.errors import ApiError
from server.generation import Renderer, check_model, serve
from server.prompts import ChatOptions, Tokenizer, split_chat
from server.protocol import ChatCompletionRequest, NamedToolChoice
from server.state import Caller, ServerState, off_loop


def tool_parser_class(name: str, tokenizer: Tokenizer) -> type[ToolParser]:
    """vLLM's tool-call parser `name`, tried on the tokenizer as `vllm serve` tries it at
    start (a parser may need tokens the vocabulary lacks)."""
    known = ToolParserManager.list_registered()
    if name not in known:
        raise ValueError(
            f"--tool-call-parser {name!r}: vLLM has no such parser ({', '.join(known)})"
        )
    parser = ToolParserManager.get_tool_parser(name)
    try:
        parser(tokenizer)
    except Exception as exc:  # whatever the parser's own check raises
        raise ValueError(
            f"--tool-call-parser {name} cannot be used with this tokenizer: {exc}"
        ) from exc
    return parser


@dataclass
class AutoTools:
    """tool_choice "auto": vLLM's tool-call parser, and the request in vLLM's own form, which
    is what its parsers read (tools, tool_choice)."""

    parser: type[ToolParser]
    request: VllmChatRequest

    def new_parser(self, tokenizer: Tokenizer) -> ToolParser:
        # Parsers keep state while streaming: one per choice, as vLLM makes them.
        return self.parser(tokenizer, self.request.tools)

    def adjust(self, body: ChatCompletionRequest) -> ChatCompletionRequest:
        """`body` with what the parser adjusted in its request (see `auto_tools`)."""
        return body.model_copy(
            update={
                "skip_special_tokens": self.request.skip_special_tokens,
                "spaces_between_special_tokens": self.request.spaces_between_special_tokens,
            }
        )


def auto_tools(state: ServerState, body: ChatCompletionRequest) -> AutoTools | None:
    if body.effective_tool_choice() != "auto":
        return None
    if state.tool_parser is None:
        raise ApiError(
            400,
            'tool_choice "auto" (the default when tools are given) requires the server to be '
            "started with --enable-auto-tool-choice and --tool-call-parser, as vLLM's; use "
            '"none", "required" or a named function',
            param="tool_choice",
        )
    fields = body.model_dump(
        include={
            "messages",
            "tools",
            "chat_template_kwargs",
            "skip_special_tokens",
            "spaces_between_special_tokens",
        },
        exclude_none=True,
    )
    request = VllmChatRequest.model_validate({**fields, "tool_choice": "auto"})
    # As vLLM: the parser adjusts the request before generation; for "auto" that is only how
    # special tokens are detokenized (parsers whose tool-call tags are special tokens need
    # them kept in the text).
    request = state.tool_parser(state.tokenizer, request.tools).adjust_request(request)
    return AutoTools(state.tool_parser, request)  # type: ignore[arg-type]


def chat_options(state: ServerState, body: Any) -> ChatOptions:
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    return ChatOptions(
        tools=tools, chat_template=state.chat_template, kwargs=body.chat_template_kwargs
    )


def tool_schema(body: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema a tool choice decodes under (vLLM's, for named and required); none
    for "auto", whose calls the tool-call parser finds in free text."""
    choice = body.effective_tool_choice()
    if choice in ("none", "auto"):
        return None
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
    tools = auto_tools(state, body)
    if tools is not None:
        body = tools.adjust(body)
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
        render=functools.partial(ChatRenderer, auto_tools=tools),
        tool_schema=schema,
    )


def _tool_call(name: str, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    return {
        "id": call_id or f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


@dataclass
class StreamedTools:
    """One choice's stream through vLLM's tool-call parser, which is given the whole text so
    far and the new delta at every step, and answers what to send (or None: nothing yet)."""

    parser: ToolParser
    request: VllmChatRequest
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    called: bool = False

    def delta(self, completion: CompletionOutput) -> dict[str, Any]:
        text = self.text + completion.text
        token_ids = [*self.token_ids, *completion.token_ids]
        message = self.parser.extract_tool_calls_streaming(
            self.text,
            text,
            completion.text,
            self.token_ids,
            token_ids,
            list(completion.token_ids),
            self.request,
        )
        self.text, self.token_ids = text, token_ids
        delta: dict[str, Any] = {"role": "assistant", "content": None}
        if message is None:
            return delta
        delta["content"] = message.content
        if message.tool_calls:
            self.called = True
            if completion.finish_reason is not None:
                # As vLLM: arguments parsed but not streamed yet go with the last delta.
                last = message.tool_calls[-1]
                if last.function is not None:
                    last.function.arguments = (
                        last.function.arguments or ""
                    ) + self.parser.get_remaining_unstreamed_args()
            delta["tool_calls"] = [c.model_dump(exclude_none=True) for c in message.tool_calls]
        return delta

    def finish_reason(self, completion: CompletionOutput) -> str | None:
        # As vLLM: a stream that called tools and stopped by itself ends in "tool_calls".
        if self.called and completion.finish_reason == "stop":
            return "tool_calls"
        return completion.finish_reason


@dataclass
class StreamedForcedTools:
    """One choice's stream under a named or "required" tool choice: the text, decoded under
    the tool schema, turned into tool-call deltas by vLLM's own streaming helpers (a named
    call's text is its arguments; "required" decodes a JSON array of name and parameters)."""

    choice: NamedToolChoice | str
    tokenizer: Tokenizer
    text: str = ""
    name_sent: bool = False

    def delta(self, completion: CompletionOutput) -> dict[str, Any]:
        previous, self.text = self.text, self.text + completion.text
        message = None
        if isinstance(self.choice, NamedToolChoice):
            if completion.text or not self.name_sent:
                message, self.name_sent = extract_named_tool_call_streaming(
                    delta_text=completion.text,
                    function_name=self.choice.function.name,
                    function_name_returned=self.name_sent,
                    tool_call_idx=None,
                    tool_call_id_type="random",
                    tokenizer=self.tokenizer,
                )
        else:
            message, self.name_sent = extract_required_tool_call_streaming(
                previous_text=previous,
                current_text=self.text,
                tool_call_idx=None,
                tool_call_id_type="random",
            )
        delta: dict[str, Any] = {"role": "assistant", "content": None}
        if message is not None and message.tool_calls:
            delta["tool_calls"] = [c.model_dump(exclude_none=True) for c in message.tool_calls]
        return delta

    def finish_reason(self, completion: CompletionOutput) -> str | None:
        # As the whole answer: "required" that stopped by itself ends in "tool_calls".
        if self.choice == "required" and completion.finish_reason == "stop":
            return "tool_calls"
        return completion.finish_reason


class ChatRenderer(Renderer):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"
    body: ChatCompletionRequest

    def __init__(self, *args: Any, auto_tools: AutoTools | None = None) -> None:
        super().__init__(*args)
        self.auto_tools = auto_tools
        self._streams: dict[int, StreamedTools | StreamedForcedTools] = {}

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
        if final:
            message, finish_reason = self._message(completion)
        else:
            message, finish_reason = self._delta(index, completion)
        return {
            "index": index,
            ("message" if final else "delta"): message,
            "logprobs": self._logprobs(completion),
            "finish_reason": finish_reason,
            "stop_reason": completion.stop_reason,
        }

    def _delta(self, index: int, completion: Any) -> tuple[dict[str, Any], Any]:
        choice = self.body.effective_tool_choice()
        if self.auto_tools is None and choice in ("none", "auto"):
            return self._text(completion)
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = self._new_stream(choice)
        return stream.delta(completion), stream.finish_reason(completion)

    def _new_stream(self, choice: NamedToolChoice | str) -> StreamedTools | StreamedForcedTools:
        if self.auto_tools is None:
            return StreamedForcedTools(choice, self.tokenizer)
        parser = self.auto_tools.new_parser(self.tokenizer)
        return StreamedTools(parser, self.auto_tools.request)

    def _message(self, completion: Any) -> tuple[dict[str, Any], Any]:
        if self.auto_tools is not None:
            return self._parsed(completion)
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
                return self._text(completion)  # cut short: the text as it is
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        return self._text(completion)

    @staticmethod
    def _text(completion: Any) -> tuple[dict[str, Any], Any]:
        return {"role": "assistant", "content": completion.text}, completion.finish_reason

    def _parsed(self, completion: Any) -> tuple[dict[str, Any], Any]:
        """tool_choice "auto": the tool calls vLLM's parser finds in the text, and the text
        around them as content; finish_reason "tool_calls" when there are any, as vLLM's."""
        assert self.auto_tools is not None
        info = self.auto_tools.new_parser(self.tokenizer).extract_tool_calls(
            completion.text, self.auto_tools.request
        )
        message: dict[str, Any] = {"role": "assistant", "content": info.content}
        if not info.tools_called:
            return message, completion.finish_reason
        message["tool_calls"] = [
            _tool_call(c.function.name, c.function.arguments, c.id) for c in info.tool_calls
        ]
        return message, "tool_calls"

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
