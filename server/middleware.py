"""ASGI middleware on the request path: the body size and concurrency limits."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import send_error


class BodySizeLimit:
    """Refuse bodies over a byte limit with a 413, before the app sees them.

    The body is read here (at most max_bytes of it) and handed to the app whole: counting
    inside the app's receive instead made an oversized chunked upload a 400, since the
    framework turns any error while reading the body into "error parsing the body"."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        try:
            too_large = declared is not None and int(declared) > self.max_bytes
        except ValueError:
            too_large = False  # the server rejects a malformed Content-Length itself
        if too_large:
            await send_error(send, 413, f"request body over {self.max_bytes} bytes")
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending the whole body
            body = message.get("body", b"")
            received += len(body)
            if received > self.max_bytes:
                await send_error(send, 413, f"request body over {self.max_bytes} bytes")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # what follows the body: the disconnect, if any

        await self.app(scope, replay, send)


class ConcurrencyLimit:
    """At most `limit` generation and pre-warm requests at once (streams count until their
    last chunk); more are answered 503 at once instead of queueing without bound."""

    PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/augmentations")

    def __init__(self, app: ASGIApp, limit: int, on_refused: Callable[[], None]) -> None:
        self.app = app
        self.limit = limit
        self.on_refused = on_refused
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.limit <= 0
            or scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in self.PATHS
        ):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.on_refused()
            await send_error(
                send,
                503,
                f"server overloaded: {self.limit} requests in progress; retry shortly",
                type="server_error",
                code="overloaded",
                headers=[(b"retry-after", b"1")],
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
