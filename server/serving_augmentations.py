"""The augmentation endpoints: pre-warm (POST /v1/augmentations) and a key's status
(GET /v1/augmentations/{key}), scoped to the caller's tenant."""

from __future__ import annotations

from typing import Any

from cache_store.keys import validate_key
from cache_store.types import KeyState
from cache_store.value import ValueFigure
from server.errors import ApiError
from server.generation import check_context_length
from server.protocol import AugmentationRequest
from server.state import Caller, ServerState, off_loop


async def prewarm(state: ServerState, body: AugmentationRequest, caller: Caller) -> dict[str, Any]:
    items = [(item, caller.tenant_for(item.tenant or body.tenant)) for item in body.items()]
    results = []
    for item, tenant in items:
        # The same tokens as a completion's `context`, so the keys match later requests.
        context_ids = await off_loop(state, state.tokenizer.encode, item.context)
        check_context_length(state, context_ids)
        job, outcome = await state.augmenter.prewarm(context_ids, tenant)
        status = await state.augmenter.status(job.key)
        results.append(
            {
                "key": job.key,
                "outcome": outcome,
                "state": status.state.value,
                "context_tokens": len(context_ids),
            }
        )
    return {"object": "list", "data": results}


async def augmentation_status(state: ServerState, key: str, caller: Caller) -> dict[str, Any]:
    try:
        validate_key(key)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="key") from exc
    status = await state.augmenter.status(key)
    # A key of another tenant is answered exactly like one that does not exist, so the
    # answer cannot tell whether another tenant sent that context.
    if status.state is KeyState.ABSENT or not caller.may_see(status.tenant):
        raise ApiError(
            404,
            f"no augmentation with key {key} for this API key's tenant",
            param="key",
            code="augmentation_not_found",
        )
    return {
        "key": key,
        "state": status.state.value,
        "reason": status.reason,
        "attempts": status.attempts,
        "value": value_body(status.value),
    }


def value_body(figure: ValueFigure | None) -> dict[str, Any] | None:
    """The value check's figure of a key's latents, as the worker measured it."""
    if figure is None:
        return None
    return {
        "perplexity_change": figure.relative_change,
        "delta_nats": figure.delta,
        "std_error_nats": figure.std_error,
        "tokens": figure.tokens,
    }
