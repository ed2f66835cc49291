"""Request bodies of the OpenAI-compatible API, with Deliberate's few extra fields.

Unknown fields are ignored, as OpenAI clients send many optional ones; fields that would let
a client inject tensors are refused outright.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Raw embeddings from clients are never accepted (CVE-2025-62164: a crafted tensor corrupted
# vLLM's memory). Latents are built by the server from its own store, nowhere else.
FORBIDDEN_FIELDS = ("prompt_embeds", "embeds", "inputs_embeds", "latents")
# vLLM's own API server bounds the seed to a signed 64-bit integer (torch's generator seed).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False  # vLLM's extension; benchmarks use it for fixed-length outputs
    # --- Deliberate -----------------------------------------------------------------------
    augment: bool = Field(True, description="false: never use or request latents")
    augment_wait_seconds: float = Field(
        0.0, ge=0.0, description="wait this long for a pending augmentation before answering"
    )
    tenant: str | None = Field(None, min_length=1, max_length=128)

    @model_validator(mode="before")
    @classmethod
    def _refuse_client_tensors(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in FORBIDDEN_FIELDS:
                if name in data:
                    raise ValueError(
                        f"'{name}' is not accepted: this server never takes embeddings from "
                        "clients; send text (and an optional 'context') instead"
                    )
        return data


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    context: str | None = Field(
        None,
        description="reusable text that comes before the prompt; the part that is augmented",
    )
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = False
    suffix: None = None

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("send one prompt per request (a list of exactly one string)")
        return self.prompt[0]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    context_messages: int | None = Field(
        None,
        ge=0,
        description="how many leading messages form the reusable context; "
        "default: all before the last user message",
    )


class AugmentationContext(BaseModel):
    model_config = ConfigDict(extra="forbid")

    context: str = Field(min_length=1)
    tenant: str | None = Field(None, min_length=1, max_length=128)


class AugmentationRequest(BaseModel):
    """Pre-warm: one context, or many at once."""

    model_config = ConfigDict(extra="forbid")

    context: str | None = Field(None, min_length=1)
    contexts: list[AugmentationContext] | None = Field(None, min_length=1, max_length=1000)
    tenant: str | None = Field(None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _one_form(self) -> AugmentationRequest:
        if (self.context is None) == (self.contexts is None):
            raise ValueError("send either 'context' or 'contexts' (a list), not both or neither")
        return self

    def items(self) -> list[AugmentationContext]:
        if self.contexts is not None:
            return self.contexts
        assert self.context is not None
        return [AugmentationContext(context=self.context, tenant=self.tenant)]
