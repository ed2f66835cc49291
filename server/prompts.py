"""Splitting a request into the reusable context and the rest, as token ids.

The split is where latents go, so both halves are tokenized separately and the plain prompt
is their concatenation: a hit and a miss differ by the latents and nothing else.
"""

from __future__ import annotations

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


def split_completion(tokenizer: Tokenizer, context: str | None, prompt: str) -> PromptParts:
    if not context:
        return PromptParts([], tokenizer.encode(prompt))
    # Special tokens (a BOS, for models that use one) belong at the start of the context.
    return PromptParts(
        tokenizer.encode(context), tokenizer.encode(prompt, add_special_tokens=False)
    )


def split_chat(
    tokenizer: Tokenizer, messages: Sequence[ChatMessage], context_messages: int | None
) -> PromptParts:
    """Context: the first `context_messages` messages, by default all before the last user
    message, rendered with the model's chat template."""
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    if context_messages is None:
        user_turns = [i for i, m in enumerate(messages) if m.role == "user"]
        context_messages = user_turns[-1] if user_turns else 0
    if context_messages > len(messages):
        raise ValueError(
            f"context_messages is {context_messages} but the request has {len(messages)} messages"
        )
    full = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    if context_messages == 0:
        return PromptParts([], tokenizer.encode(full, add_special_tokens=False))
    context = tokenizer.apply_chat_template(
        conversation[:context_messages], tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(context):
        # A template that renders earlier turns differently once later ones exist: there is
        # no stable prefix to augment, so the whole prompt goes through plainly.
        return PromptParts([], tokenizer.encode(full, add_special_tokens=False))
    return PromptParts(
        tokenizer.encode(context, add_special_tokens=False),
        tokenizer.encode(full[len(context) :], add_special_tokens=False),
    )
