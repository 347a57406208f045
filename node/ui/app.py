"""The operator page as an ASGI app (Starlette): one HTML page, its script, a JSON snapshot
and a server-sent-events stream of snapshots.

Read-only by construction: every route is GET (HEAD), nothing the page sends changes the
federation. The page loads nothing from elsewhere (its script and style are served here;
the Content-Security-Policy allows only this origin), so it works on an air-gapped
hospital network and no third party learns that it was opened.

Protections, outermost first:

* security headers on every response (CSP, no framing, no referrer, no caching, nosniff);
* a Host-header allow-list (loopback names, plus the names configured): a web page that
  re-binds its own domain name to 127.0.0.1 (DNS rebinding) gets 400, not the page;
* HTTP Basic credentials where configured, compared in constant time.

The event stream polls the feed every `poll_s` and sends a snapshot only when it changed
(the page ticks its "seconds ago" and deadline countdowns itself between snapshots), with a
comment line every `keepalive_s` so proxies and browsers keep the connection open. When the
host stops the page (`app.state.closing`), each stream sends the feed's last state once more
if it changed, then ends: a director that finished is seen to have finished.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.ui.feed import OperatorFeed, public_view

__all__ = ["LOOPBACK_HOSTS", "create_app"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


class BasicAuth:
    """HTTP Basic, one user; a 401 with a challenge otherwise."""

    def __init__(self, app: ASGIApp, *, username: str, password: str) -> None:
        self.app = app
        self._expected = (username.encode("utf-8"), password.encode("utf-8"))

    def _allowed(self, header: str | None) -> bool:
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        # Both compared, always: the time taken does not tell which one was wrong.
        ok_user = hmac.compare_digest(user, self._expected[0])
        ok_password = hmac.compare_digest(password, self._expected[1])
        return bool(sep) and ok_user and ok_password

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        raw = headers.get(b"authorization")
        if self._allowed(raw.decode("latin-1") if raw else None):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse(
            "credentials required",
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="fedbus operator page", charset="UTF-8"'},
        )
        await response(scope, receive, send)


def _static(name: str) -> bytes:
    return resources.files("node.ui").joinpath("static", name).read_bytes()


def create_app(
    feed: OperatorFeed,
    *,
    poll_s: float = 0.5,
    keepalive_s: float = 15.0,
    credentials: tuple[str, str] | None = None,
    allowed_hosts: Sequence[str] = (),
    max_streams: int = 32,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The page's ASGI app over `feed`. `app.state.closing = True` ends open streams."""
    files = {path: (_static(name), media) for path, (name, media) in STATIC.items()}
    streams = {"open": 0}

    async def view() -> dict[str, Any]:
        status, records = await asyncio.to_thread(feed.snapshot)
        return public_view(status, records, now=clock())

    async def page(request: Request) -> Response:
        body, media = files[request.url.path]
        return Response(body, media_type=media)

    async def snapshot(request: Request) -> Response:
        return JSONResponse(await view())

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def events(request: Request) -> Response:
        if streams["open"] >= max_streams:
            return PlainTextResponse("too many open streams", status_code=503)
        streams["open"] += 1

        async def stream() -> Any:
            last = None
            quiet = 0.0
            try:
                yield f"retry: {int(max(poll_s, 1.0) * 1000)}\n\n"
                while not await request.is_disconnected():
                    closing = app.state.closing  # read first: what follows is the last word
                    data = await view()
                    key = json.dumps({k: v for k, v in data.items() if k != "now"}, sort_keys=True)
                    if key != last:
                        last, quiet = key, 0.0
                        yield f"event: snapshot\ndata: {json.dumps(data)}\n\n"
                    elif quiet >= keepalive_s:
                        quiet = 0.0
                        yield ": keep-alive\n\n"
                    if closing:
                        break  # the host stops: its final state (say, "finished") was sent
                    await asyncio.sleep(poll_s)
                    quiet += poll_s
            finally:
                streams["open"] -= 1

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
        )

    middleware = [
        Middleware(SecurityHeaders),
        Middleware(
            TrustedHostMiddleware,
            allowed_hosts=[*LOOPBACK_HOSTS, *allowed_hosts],
            www_redirect=False,
        ),
    ]
    if credentials is not None:
        middleware.append(Middleware(BasicAuth, username=credentials[0], password=credentials[1]))
    routes = [Route(path, page, methods=["GET"]) for path in STATIC]
    routes += [
        Route("/api/snapshot", snapshot, methods=["GET"]),
        Route("/api/events", events, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.closing = False
    return app
