"""The value check end to end: the real `deliberate serve` (real vLLM, the bundled SmolLM2 and
a bundled coprocessor, in-memory store, in-process worker) over real HTTP.

The texts are picked for what the latents of the bundled checkpoint with the paper's
placement (`bundled_checkpoint_dir("insert")`, latents inserted after the context) do on
them, as the value check measured them on these machines (fp32; the checkpoint's recorded
geometry: one point, half the contexts checked, docs/coprocessor.md): technical reference
text of the out-of-domain set, where they hurt; held-out prose of the training register, where
they help; a repeated word sequence on which they are confidently harmful for that one
context. Every text is in the check's sample (`ValueCheck.checks`), so each gets a figure.
Each stream runs under its own tenant, so each is judged on its own estimate.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from coprocessor_worker import data
from coprocessor_worker.checkpoints import bundled_checkpoint_dir
from tests.fixtures.processes import start_server

pytestmark = pytest.mark.slow

MIN_CONTEXTS = 6
# Indices into data.out_of_domain_documents() / data.bundled_documents("held_out").
HARMED = (3, 11, 25, 26, 27, 29)
HELPED = (1, 11, 15, 18, 30, 42)
# A sequence of 30 random words said three times: the plain decoder copies the third time
# almost perfectly, and the latents inserted before the copy break it (measured +0.97 nats
# per token, lower 99.5% bound +0.18).
WORDS = (
    "violet violet apple paper candle harbor violet paper harbor engine mirror cloud candle "
    "stone paper stone river mirror paper candle silver mirror stone paper river silver river "
    "garden engine harbor"
)
HARMFUL_CONTEXT = f"{WORDS}, " * 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, base = start_server(
        tmp_path_factory.mktemp("logs"),
        "--coprocessor",
        str(bundled_checkpoint_dir("insert")),
        # Independent of the checkpoint's recorded gate: this is about the check.
        "--allow-unvalidated-coprocessor",
        "--value-min-contexts",
        str(MIN_CONTEXTS),
        "--lookup-timeout-seconds",
        "0.25",  # generous: the test machine is shared and noisy
        # Each request re-reads the estimates: with the default 2 s, a verdict cached while a
        # stream's last context was measured (the tenant still short of MIN_CONTEXTS, so
        # decided by the global estimate, which the harmful stream holds) was served once.
        "--value-refresh-seconds",
        "0.001",
    )
    yield base
    assert process.stop() == 0


def _complete(server: str, context: str, tenant: str, wait_s: float = 0) -> dict:
    body = {
        "model": httpx.get(f"{server}/v1/models").json()["data"][0]["id"],
        "context": context,
        "prompt": "\nQuestion: What is this about?\nAnswer:",
        "max_tokens": 2,
        "temperature": 0,
        "tenant": tenant,
        "augment_wait_seconds": wait_s,
    }
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["augmentation"]


def _measure(server: str, contexts: list[str], tenant: str) -> list[dict]:
    """Send each context once and wait until the in-process worker has measured it."""
    out = []
    for context in contexts:
        first = _complete(server, context, tenant, wait_s=240)
        state = httpx.get(f"{server}/v1/augmentations/{first['key']}").json()
        assert state["state"] in ("ready", "declined"), state
        assert state["value"] is not None, state  # picked inside the check's sample
        out.append(state)
    return out


def test_a_stream_on_which_latents_hurt_ends_served_plainly(server: str) -> None:
    ood = data.out_of_domain_documents()
    contexts = [ood[i].text for i in HARMED]
    states = _measure(server, contexts, "reference-docs")
    figures = [s["value"]["delta_nats"] for s in states]
    assert sum(figures) / len(figures) > 0  # the measured harm this stream is picked for
    for context in contexts:
        again = _complete(server, context, "reference-docs")
        assert again["status"] == "declined", again
    published = [c for c, s in zip(contexts, states, strict=True) if s["state"] == "ready"]
    reason = _complete(server, published[0], "reference-docs")["reason"]
    assert "tenant estimate" in reason and "upper bound" in reason  # evidence, not cold start
    metrics = httpx.get(f"{server}/metrics").text
    assert 'deliberate_requests_total{endpoint="completions",status="declined"}' in metrics
    assert "deliberate_worker_value_change_ratio_count" in metrics


def test_a_stream_on_which_latents_help_keeps_them_on(server: str) -> None:
    prose = data.bundled_documents("held_out")
    contexts = [prose[i].text for i in HELPED]
    states = _measure(server, contexts, "prose")
    assert all(s["state"] == "ready" and s["value"]["delta_nats"] < 0 for s in states)
    for context in contexts:
        served = _complete(server, context, "prose")
        assert served["status"] == "hit", served


def test_a_confidently_harmful_context_is_declined(server: str) -> None:
    first = _complete(server, HARMFUL_CONTEXT, "numbers", wait_s=240)
    state = httpx.get(f"{server}/v1/augmentations/{first['key']}").json()
    assert state["state"] == "declined", state
    assert "confidently harmful" in state["reason"]
    value = state["value"]
    assert value["delta_nats"] - 2.576 * value["std_error_nats"] > 0
    # Not recomputed while the mark lasts: the next request is answered plainly at once.
    assert _complete(server, HARMFUL_CONTEXT, "numbers")["status"] == "declined"
