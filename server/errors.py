"""Errors answered to clients in OpenAI's error shape."""

from __future__ import annotations

import json

from starlette.types import Send


class ApiError(Exception):
    """An error the client caused, answered in OpenAI's error format."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


async def send_error(
    send: Send,
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer an error straight from ASGI middleware, before the app sees the request."""
    code = code or ("request_too_large" if status == 413 else None)
    body = json.dumps(ApiError(status, message, type=type, code=code).body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})
