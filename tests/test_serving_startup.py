"""`deliberate serve` when the engine fails to start: the embedded worker must stop and the
store close, not stay behind in a process that is going down (issue 13 item 11).

The engine is the real one (vLLM's AsyncLLM), refused by vLLM's own validation: a
max_model_len past the bundled decoder's 8192 positions. The embedded worker is the real
one (the bundled coprocessor on the in-memory store). `make_store` and `make_worker` are
wrapped only to keep hold of what they built.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from deliberate import serving
from deliberate.settings import Settings


async def test_engine_failure_stops_the_embedded_worker_and_closes_the_store(
    monkeypatch: pytest.MonkeyPatch, bundled_decoder: Path
) -> None:
    built: dict[str, Any] = {}

    def keep(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            built[name] = real(*args, **kwargs)
            return built[name]

        return wrapper

    monkeypatch.setattr(serving, "make_store", keep("store", serving.make_store))
    monkeypatch.setattr(serving, "make_worker", keep("worker", serving.make_worker))
    settings = Settings(
        model=bundled_decoder,
        max_model_len=100_000,  # the decoder has 8192 positions: vLLM refuses to start
        enforce_eager=True,
        torch_threads=1,
        dtype="float32",
    )
    with pytest.raises(Exception, match="max_model_len") as raised:
        await serving.serve(settings)
    assert "100000" in str(raised.value)

    assert {"store", "worker"} <= set(built), "the failure came before the worker was built"
    workers = [t for t in asyncio.all_tasks() if t.get_name() == "embedded-worker"]
    assert all(t.done() for t in workers), "the embedded worker outlived the failed start"
    assert not built["worker"].ready
    with pytest.raises(RuntimeError, match="after close"):
        await built["store"].ping()
