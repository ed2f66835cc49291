"""`deliberate enqueue`: reading the JSONL file, batching, per-context fallback, the summary.
The server side (POST /v1/augmentations on a real engine) is covered in test_server.py; here a
small real HTTP app on loopback plays the server, so the command runs unchanged."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deliberate.commands import enqueue
from tests.fixtures.redis_server import free_port


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_contexts_keeps_context_and_tenant_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "in.jsonl",
        [
            json.dumps({"context": "a history", "tenant": "u1", "other": 3}),
            "",
            "   ",
            json.dumps({"context": "another"}),
        ],
    )
    assert list(enqueue.read_contexts(path)) == [
        {"context": "a history", "tenant": "u1"},
        {"context": "another"},
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "in.jsonl:2: not JSON"),
        (json.dumps({"text": "no context field"}), "in.jsonl:2: expected an object"),
        (json.dumps(["a", "list"]), "in.jsonl:2: expected an object"),
        (json.dumps({"context": 5}), "in.jsonl:2: expected an object"),
    ],
)
def test_read_contexts_names_the_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = _write(tmp_path / "in.jsonl", [json.dumps({"context": "ok"}), line])
    with pytest.raises(SystemExit, match=message):
        list(enqueue.read_contexts(path))


def test_summarize_words() -> None:
    outcomes = ["enqueued", "enqueued", "already_ready", "already_pending", "queue_full",
                "failed", "rejected", "too-short"]  # fmt: skip
    counts = enqueue.summarize([{"outcome": o} for o in outcomes])
    assert dict(counts) == {
        "new": 2, "ready": 1, "pending": 1, "refused": 1, "failed": 1, "rejected": 1,
        "too-short": 1,
    }  # fmt: skip


class FakeServer:
    """POST /v1/augmentations with the real response shape; a context containing "TOO LONG"
    makes the whole request a 400, as the real server does for an over-long context."""

    def __init__(self) -> None:
        self.requests: list[list[dict[str, str]]] = []
        self.seen: set[str] = set()

    async def augmentations(self, request: Request) -> Response:
        contexts = (await request.json())["contexts"]
        self.requests.append(contexts)
        if any("TOO LONG" in c["context"] for c in contexts):
            return JSONResponse({"error": {"message": "context too long"}}, status_code=400)
        data = []
        for c in contexts:
            key = c.get("tenant", "") + "/" + c["context"]
            outcome = "already_pending" if key in self.seen else "enqueued"
            if "ready" in c["context"]:
                outcome = "already_ready"
            self.seen.add(key)
            data.append({"key": key, "outcome": outcome, "state": "pending"})
        return JSONResponse({"object": "list", "data": data})


@pytest.fixture
def fake_server() -> Iterator[tuple[FakeServer, str]]:
    fake = FakeServer()
    app = Starlette(routes=[Route("/v1/augmentations", fake.augmentations, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # uvicorn sets `started` once it listens
        assert time.monotonic() < deadline and thread.is_alive(), "fake server did not start"
        thread.join(0.05)
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_enqueue_batches_reports_and_isolates_a_rejected_context(
    tmp_path: Path, fake_server: tuple[FakeServer, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, url = fake_server
    lines = [json.dumps({"context": f"history {i}", "tenant": "u"}) for i in range(5)]
    lines[3] = json.dumps({"context": "TOO LONG history"})
    lines.append(json.dumps({"context": "history 0", "tenant": "u"}))  # a duplicate
    lines.append(json.dumps({"context": "ready one"}))
    path = _write(tmp_path / "nightly.jsonl", lines)
    args = argparse.Namespace(file=path, url=url, api_key=None, batch_size=3)

    code = enqueue.run(args)

    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == (
        "4 new, 1 ready, 1 pending, 0 refused, 0 failed, 1 rejected, 0 too-short"
    )
    assert "context 4 rejected: HTTP 400" in out.err
    assert code == 1  # a rejected context is worth a non-zero exit in a nightly job
    # Batches of 3; the refused batch (contexts 4-6) was retried one at a time.
    assert [len(r) for r in fake.requests] == [3, 3, 1, 1, 1, 1]
