"""Request bodies of the OpenAI-compatible API, with vLLM's sampling extensions and
Deliberate's few extra fields.

Every field a request may carry is declared here, and every one is honoured: an unknown or
unsupported field is refused with a 400 that names it (`extra="forbid"`), never accepted and
dropped. Fields that would let a client inject tensors are refused outright.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Raw embeddings from clients are never accepted (CVE-2025-62164: a crafted tensor corrupted
# vLLM's memory). Latents are built by the server from its own store, nowhere else.
FORBIDDEN_FIELDS = ("prompt_embeds", "embeds", "inputs_embeds", "latents")
# vLLM's own API server bounds the seed to a signed 64-bit integer (torch's generator seed).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

TokenId = Annotated[int, Field(ge=0)]


class Strict(BaseModel):
    """Unknown fields are refused, so no parameter is ever silently ignored."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False
    """A last chunk with `choices: []` and the request's `usage`."""
    continuous_usage_stats: bool = False
    """vLLM's extension: `usage` so far on every chunk."""


class JsonSchema(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.json_schema is None
        ):
            raise ValueError("type 'json_schema' needs json_schema.schema")
        return self


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs` extension (guided decoding); one constraint at a time."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class GenerationRequest(Strict):
    model: str | None = None
    """Optional, as in vLLM: absent means the served model."""
    max_tokens: int | None = Field(None, ge=1)
    # Sampling fields left unset take the model's generation_config defaults, as in vLLM.
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, as OpenAI sends it) -> bias added to its logit, -100..100."""
    response_format: ResponseFormat | None = None
    user: str | None = None
    """OpenAI's end-user id; like OpenAI and vLLM, it does not change the output."""
    # --- vLLM's sampling extensions -------------------------------------------------------
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    stop_token_ids: list[TokenId] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False  # benchmarks use it for fixed-length outputs
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[TokenId] | None = Field(None, min_length=1)
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputs | None = None
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

    @model_validator(mode="after")
    def _check_bias(self) -> GenerationRequest:
        for token, bias in (self.logit_bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias: keys are token ids; got '{token}'")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: values are within [-100, 100]; got {bias}")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    """Text, token ids, or a batch of either (as vLLM takes them)."""
    context: str | None = Field(
        None,
        description="reusable text that comes before the prompt; the part that is augmented",
    )
    max_tokens: int | None = Field(None, ge=0)
    """0 only with `echo`: the prompt's logprobs, nothing generated."""
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: None = None

    @model_validator(mode="after")
    def _check_forms(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: an empty list")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is accepted only with echo")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch: each item is text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if any(isinstance(x, list) and not x for x in p):
            raise ValueError("a prompt in the batch is an empty list of token ids")
        return list(p)  # type: ignore[arg-type]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check_roles(self) -> ChatMessage:
        # content: null is taken as empty text, for every role, as vLLM takes it.
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs tool_call_id")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM's extension: extra variables for the chat template."""
    context_messages: int | None = Field(
        None,
        ge=0,
        description="how many leading messages form the reusable context; "
        "default: all before the last user message",
    )

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice: needs 'tools'")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice: no tool named '{self.tool_choice.function.name}' in tools"
                )
        return self

    def effective_tool_choice(self) -> str | NamedToolChoice:
        """As vLLM: with tools and no tool_choice, "auto"; with no tools, "none"."""
        if not self.tools:
            return "none"
        return self.tool_choice if self.tool_choice is not None else "auto"


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either 'prompt' or 'messages'")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[TokenId]


class AugmentationContext(Strict):
    context: str = Field(min_length=1)
    tenant: str | None = Field(None, min_length=1, max_length=128)


class AugmentationRequest(Strict):
    """Pre-warm: one context, or many at once."""

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
