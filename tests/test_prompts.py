"""Splitting requests into context and rest with the real tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.prompts import split_chat, split_completion
from server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest


@pytest.fixture(scope="module")
def tokenizer(bundled_decoder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_decoder)


def _messages(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=text) for role, text in pairs]  # type: ignore[arg-type]


def test_chat_context_is_everything_before_the_last_user_message(tokenizer) -> None:
    messages = _messages(
        ("system", "You answer questions about the attached report."),
        ("user", "First question?"),
        ("assistant", "First answer."),
        ("user", "Second question?"),
    )
    parts = split_chat(tokenizer, messages, None)
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    whole = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert parts.context_ids + parts.rest_ids == tokenizer.encode(whole, add_special_tokens=False)
    assert "Second question?" in tokenizer.decode(parts.rest_ids)
    assert "Second question?" not in tokenizer.decode(parts.context_ids)
    assert "First answer." in tokenizer.decode(parts.context_ids)


def test_chat_context_override_and_bounds(tokenizer) -> None:
    messages = _messages(("system", "Policy text."), ("user", "Question?"))
    only_system = split_chat(tokenizer, messages, 1)
    assert "Policy text." in tokenizer.decode(only_system.context_ids)
    none = split_chat(tokenizer, messages, 0)
    assert none.context_ids == []
    with pytest.raises(ValueError, match="context_messages"):
        split_chat(tokenizer, messages, 5)


def test_completion_split_keeps_the_plain_prompt(tokenizer) -> None:
    parts = split_completion(tokenizer, "A document.", "\nQuestion:")
    assert parts.context_ids == tokenizer.encode("A document.")
    assert parts.context_ids + parts.rest_ids == tokenizer.encode("A document.\nQuestion:")
    assert split_completion(tokenizer, None, "Hi").context_ids == []


def test_requests_refuse_client_embeddings_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="never takes embeddings"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "prompt_embeds": "QUFB"})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": 3})
    assert CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "user": "someone", "logit_bias": {}}
    ).prompts() == ["x"]
