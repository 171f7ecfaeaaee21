"""ASGI middleware of the ranking service: request counting, admin authentication and the
body size limit, each answering before the app reads a byte of the body."""

from __future__ import annotations

import hmac
import os
import time

import orjson
from fastapi import HTTPException
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ADMIN_TOKEN_ENV = "RECDISTILL_ADMIN_TOKEN"
ROUTES = ("/rank", "/healthz", "/readyz", "/model", "/metrics", "/admin/reload")


class BodySizeLimit:
    """Answer 413 to bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit():
            return await _plain(send, 400, "Content-Length is not a number")
        if int(declared) > self.limit:
            return await _plain(send, 413, f"request body over {self.limit} bytes")
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class AdminAuth:
    """Answer 401 to ``/admin/`` requests without the admin token, before the body is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/admin/"):
            refusal = _admin_refusal(dict(scope["headers"]).get(b"authorization", b""))
            if refusal is not None:
                return await _plain(send, 401, refusal, [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class RequestCounter:
    """Count responses by route and status, and stamp when each request arrived."""

    def __init__(self, app: ASGIApp, requests: Counter) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["received_at"] = time.perf_counter()
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


async def _plain(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()
) -> None:
    body = orjson.dumps({"detail": detail})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _admin_refusal(authorization: bytes) -> str | None:
    """Why an admin request with this ``Authorization`` header is refused, or None."""
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        return f"admin endpoints are disabled: set {ADMIN_TOKEN_ENV}"
    if not hmac.compare_digest(authorization, f"Bearer {token}".encode()):
        return "missing or wrong admin token (Authorization: Bearer …)"
    return None
