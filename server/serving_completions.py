"""POST /v1/completions: text before `prompt` (`context`) is the part that is augmented.

The prompt is text, token ids, or a batch of either; `echo` gives the prompt back first, with
its logprobs when `logprobs` is set (what lm-eval-harness's loglikelihood tasks read)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response
from vllm.outputs import RequestOutput

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
        prompts = body.prompts()
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from exc
    if body.echo and body.logprobs is not None and body.context and body.augment:
        # Latents occupy positions that no token stands for; prompt logprobs of an augmented
        # prompt are not defined the way clients read them.
        raise ApiError(
            400,
            "echo with logprobs cannot be combined with an augmented context; send "
            "'augment': false, or put the context in the prompt",
            param="echo",
        )
    vocab = state.vocab_size
    for prompt in prompts:
        if isinstance(prompt, list) and vocab and max(prompt) >= vocab:
            raise ApiError(
                400,
                f"prompt: token id {max(prompt)} is outside the vocabulary (size {vocab})",
                param="prompt",
            )
    parts = [
        await off_loop(state, split_completion, state.tokenizer, body.context, prompt)
        for prompt in prompts
    ]
    return await serve(
        state, body, parts, tenant, chat=False, default_max_tokens=16, render=CompletionRenderer
    )


class CompletionRenderer(Renderer):
    object_whole = "text_completion"
    object_chunk = "text_completion"
    body: CompletionRequest

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
        text = completion.text
        token_ids = list(completion.token_ids)
        logprobs = completion.logprobs
        if self.body.echo and self.body.max_tokens == 0:
            text, token_ids = "", []  # the one token vLLM had to generate is dropped
            logprobs = [] if logprobs is not None else None
        if self.body.echo and first:
            parts = self.prepared[prompt_index].parts
            prompt_text = parts.rest_text
            if prompt_text is None:
                prompt_text = self.tokenizer.decode(parts.rest_ids)
            text = prompt_text + text
            token_ids = parts.rest_ids + token_ids
            if self.body.logprobs is not None:
                prompt_lps = list(output.prompt_logprobs or [])[len(parts.context_ids) :]
                logprobs = [*prompt_lps, *(logprobs or [])]
        return {
            "index": index,
            "text": text,
            "logprobs": self._logprobs(token_ids, logprobs),
            "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason,
        }

    def _logprobs(self, token_ids: list[int], logprobs: Any) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        offsets: list[int] = []
        offset = 0
        for token_id, candidates in zip(token_ids, logprobs, strict=True):
            if candidates is None:  # the first prompt token: nothing before it
                token = self.tokenizer.decode([token_id])
                token_logprobs.append(None)
                top.append(None)
            else:
                chosen = candidates[token_id]
                token = self._token_text(token_id, chosen)
                token_logprobs.append(max(chosen.logprob, -9999.0))
                top.append(
                    {
                        self._token_text(t, lp): max(lp.logprob, -9999.0)
                        for t, lp in candidates.items()
                    }
                )
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }
