"""The real parts everything else stands on: the bundled model, vLLM with prompt embeddings,
a real redis-server."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import redis
import torch
from safetensors import safe_open
from vllm import SamplingParams

from cache_store.fingerprint import decoder_fingerprint
from tests.fixtures.redis_server import RedisServer

HELD_OUT_PARAGRAPH = (
    "The library opened its doors in the spring, after two years of work on the old station "
    "building. Volunteers painted the walls, carried in the shelves and sorted thousands of "
    "donated books. On the first morning, children from the school across the street came "
    "to borrow their first books, and the librarian read them a story about a lost dog."
)


def test_bundled_model_predicts_english(bundled_decoder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_decoder)
    model = AutoModelForCausalLM.from_pretrained(bundled_decoder, dtype=torch.float32)
    ids = tokenizer(HELD_OUT_PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    perplexity = math.exp(loss)
    # Chance is the vocabulary size (49152); the pilot measured about 12 on ordinary English.
    assert perplexity < 50, perplexity


def test_decoder_fingerprint_is_content_based(bundled_decoder: Path, tmp_path: Path) -> None:
    fingerprint = decoder_fingerprint(bundled_decoder)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (copy / name).symlink_to(bundled_decoder / name)
    assert decoder_fingerprint(copy) == fingerprint
    (copy / "config.json").unlink()
    (copy / "config.json").write_text((bundled_decoder / "config.json").read_text() + " ")
    assert decoder_fingerprint(copy) != fingerprint


def _embedding_table(model_dir: Path) -> torch.Tensor:
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return f.get_tensor("model.embed_tokens.weight")


async def _greedy(engine: object, prompt: dict, request_id: str) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=24)
    final = None
    async for output in engine.generate(prompt, params, request_id):  # type: ignore[attr-defined]
        final = output
    assert final is not None
    return list(final.outputs[0].token_ids)


@pytest.mark.slow
async def test_vllm_prompt_embeds_match_token_ids(
    vllm_engine: object, bundled_decoder: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_decoder)
    ids = tokenizer("The three primary colours are").input_ids
    embeds = _embedding_table(bundled_decoder)[ids]
    from_ids = await _greedy(vllm_engine, {"prompt_token_ids": ids}, "ids")
    from_embeds = await _greedy(vllm_engine, {"prompt_embeds": embeds}, "embeds")
    assert len(from_ids) > 0
    assert from_ids == from_embeds
    # And a different prompt gives different tokens: the comparison above can fail.
    other = tokenizer("My favourite programming language is").input_ids
    assert await _greedy(vllm_engine, {"prompt_token_ids": other}, "other") != from_ids


def test_redis_server_fixture_answers_and_stops(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=1)
    assert client.ping() is True
    client.set("k", "v")
    assert client.get("k") == b"v"
    server.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()
