"""Splitting a request into the reusable context and the rest, as token ids.

The split is where latents go, so both halves are tokenized separately and the plain prompt
is their concatenation: a hit and a miss differ by the latents and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from server.protocol import ChatMessage


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class PromptParts:
    context_ids: list[int]
    rest_ids: list[int]
    rest_text: str | None = None
    """The text the rest was tokenized from (what `echo` gives back), if it came as text."""


@dataclass(frozen=True)
class ChatOptions:
    """What the chat template is rendered with, besides the messages."""

    tools: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    """The server's template (vLLM's --chat-template); None: the tokenizer's own."""
    kwargs: dict[str, Any] | None = None
    """The request's chat_template_kwargs."""

    def template_kwargs(self) -> dict[str, Any]:
        extra: dict[str, Any] = dict(self.kwargs or {})
        if self.tools:
            extra["tools"] = self.tools
        if self.chat_template is not None:
            extra["chat_template"] = self.chat_template
        return extra


def split_completion(
    tokenizer: Tokenizer, context: str | None, prompt: str | list[int]
) -> PromptParts:
    """A prompt as text or token ids (taken as they are: no special tokens added)."""
    if isinstance(prompt, list):
        return PromptParts(tokenizer.encode(context) if context else [], list(prompt))
    if not context:
        return PromptParts([], tokenizer.encode(prompt), prompt)
    # Special tokens (a BOS, for models that use one) belong at the start of the context.
    return PromptParts(
        tokenizer.encode(context), tokenizer.encode(prompt, add_special_tokens=False), prompt
    )


def conversation(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: tool calls' arguments parsed from JSON (as vLLM
    does), `content: null` as empty text."""
    rendered = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                try:
                    arguments: Any = json.loads(call.function.arguments)
                except ValueError:
                    arguments = call.function.arguments
                calls.append(
                    {
                        "id": call.id,
                        "type": call.type,
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            message["tool_calls"] = calls
        rendered.append(message)
    return rendered


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[ChatMessage],
    options: ChatOptions,
    add_generation_prompt: bool = True,
) -> str:
    return tokenizer.apply_chat_template(  # type: ignore[no-any-return]
        conversation(messages),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **options.template_kwargs(),
    )


def split_chat(
    tokenizer: Tokenizer,
    messages: Sequence[ChatMessage],
    context_messages: int | None,
    options: ChatOptions | None = None,
) -> PromptParts:
    """Context: the first `context_messages` messages, by default all before the last user
    message, rendered with the model's chat template."""
    options = options or ChatOptions()
    if context_messages is None:
        user_turns = [i for i, m in enumerate(messages) if m.role == "user"]
        context_messages = user_turns[-1] if user_turns else 0
    if context_messages > len(messages):
        raise ValueError(
            f"context_messages is {context_messages} but the request has {len(messages)} messages"
        )
    full = render_chat(tokenizer, messages, options)
    if context_messages == 0:
        return PromptParts([], tokenizer.encode(full, add_special_tokens=False))
    context = render_chat(tokenizer, messages[:context_messages], options, False)
    if not full.startswith(context):
        # A template that renders earlier turns differently once later ones exist: there is
        # no stable prefix to augment, so the whole prompt goes through plainly.
        return PromptParts([], tokenizer.encode(full, add_special_tokens=False))
    return PromptParts(
        tokenizer.encode(context, add_special_tokens=False),
        tokenizer.encode(full[len(context) :], add_special_tokens=False),
    )
