"""HTTP-level protections against hostile clients, below the routes.

Guarantees, per process:

* **Bodies are capped** (``Settings.body_limit``): a ``Content-Length`` above the cap is answered
  413 before the app runs; a chunked body is counted as it streams and refused (413) as soon as
  it passes the cap, so no route ever holds more than the cap in memory. A request whose body
  the app did not read to the end is answered with ``Connection: close``: the rest of it is
  never read.
* **Security headers on every HTTP answer** (not on websocket frames: that is the hot path):
  ``Content-Security-Policy`` (no inline script or style, no framing), ``nosniff``,
  ``X-Frame-Options``, ``Referrer-Policy``. The interactive API docs get a looser policy of their
  own: Swagger UI loads its script from a CDN and starts it with an inline script.
* **Request heads have a deadline** (``Settings.header_timeout``): a connection that has not
  sent a complete request head, or whose websocket handshake is not answered, within it is
  closed (slowloris). At most ``Settings.max_unfinished_connections`` may be unfinished at once;
  beyond that the oldest is closed (an attacker's, as honest clients finish in milliseconds).
* **Request heads are capped** at ``MAX_HEAD_BYTES``: a longer one is answered 431 and closed
  (the HTTP parser would otherwise buffer a header for as long as the deadline lets it grow).
* **File descriptors are kept in reserve** (``Settings.fd_reserve``): a new connection that
  would leave fewer than that many free under ``RLIMIT_NOFILE`` is closed at once, so the
  database pool, the LISTEN connection and static files keep working and accept() does not fail.
  Connections already open keep being served.

Every connection closed by these rules is counted (``chat_http_connections_closed_total`` by
reason) and logged at WARNING at most once per ``BurstLog.INTERVAL`` seconds per reason.

The protocol half is tied to uvicorn's ``HttpToolsProtocol`` (``connection_made``,
``on_message_begin``, ``on_headers_complete``, ``handle_websocket_upgrade``), checked against
uvicorn 0.54, to which ``pyproject.toml`` pins it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.chat.envelope import dumps
from service.errors import BodyTooLarge

if TYPE_CHECKING:
    from service.config import Settings
    from service.metrics import Metrics

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
"""The longest request head (request line and headers) read; nginx's default allows 32 kB."""

GUARD_STATE_KEY = "connection_guard"
"""Lifespan state key of the process's ``ConnectionGuard`` (the protocol finds it there)."""

# --- ASGI: body cap and security headers --------------------------------------------------------

PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
"""The demo page and every API answer: own files only, nothing inline, never in a frame.
(``connect-src 'self'`` covers ``ws:``/``wss:`` to the same host in CSP 3 browsers.)"""

DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "img-src 'self' data: https://fastapi.tiangolo.com; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
"""Swagger UI and ReDoc as FastAPI serves them: CDN assets started by an inline script."""


def _security_headers(policy: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-security-policy", policy.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
    ]


def security_headers() -> dict[str, str]:
    """The API's security headers, for an answer sent outside ``GuardMiddleware`` (a 500)."""
    return {k.decode(): v.decode() for k, v in _security_headers(PAGE_POLICY)}


def too_large_body(limit: int) -> bytes:
    """The body of ``BodyTooLarge``'s answer, for a refusal sent before the app runs."""
    return dumps(BodyTooLarge(limit).body()).encode()


class GuardMiddleware:
    """Body cap and security headers for every HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, body_limit: int, docs_paths: frozenset[str]) -> None:
        self.app = app
        self.body_limit = body_limit
        self.docs_paths = docs_paths
        self.page_headers = _security_headers(PAGE_POLICY)
        self.docs_headers = _security_headers(DOCS_POLICY)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # websocket frames stay unwrapped
            return
        security = self.docs_headers if scope["path"] in self.docs_paths else self.page_headers
        length: int | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None  # the HTTP parser has already refused such a request
            elif name == b"transfer-encoding":
                chunked = True
        limit = self.body_limit
        if length is not None and length > limit:
            body = too_large_body(limit)
            await send(
                {
                    "type": "http.response.start",
                    "status": BodyTooLarge.http_status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                        *security,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        received = 0
        body_done = not chunked and not length

        async def receive_capped() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                if not message.get("more_body", False):
                    body_done = True
            return message

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(security)
                if not body_done:
                    # What was not read will not be: do not read it to find the next request.
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive_capped, send_with_headers)


# --- The server protocol: head deadline, unfinished-connection cap, fd reserve -------------------


class BurstLog:
    """One WARNING per reason per ``INTERVAL`` seconds, saying how many were left unsaid."""

    INTERVAL = 10.0

    def __init__(self) -> None:
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, reason: str, now: float, message: str, *args: object) -> None:
        if now < self._next.get(reason, 0.0):
            self._held[reason] = self._held.get(reason, 0) + 1
            return
        held = self._held.pop(reason, 0)
        suffix = f" ({held} more since the last report)" if held else ""
        log.warning(message + suffix, *args)
        self._next[reason] = now + self.INTERVAL


class HeadDeadline:
    """One connection's wait for its request head (or websocket handshake answer)."""

    __slots__ = ("guard", "timer", "transport")

    def __init__(self, guard: ConnectionGuard, transport: asyncio.Transport) -> None:
        self.guard = guard
        self.transport = transport
        self.timer: asyncio.TimerHandle | None = guard.loop.call_later(
            guard.header_timeout, self.expire
        )

    def done(self) -> None:
        """Head complete, handshake answered or connection gone; safe to call twice."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.guard.pending.pop(self, None)

    def expire(self) -> None:
        self.timer = None
        self.guard.pending.pop(self, None)
        self.guard.closed(
            "head_timeout",
            self,
            "request head not complete within %ss: connection closed",
            self.guard.header_timeout,
        )

    def evict(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.guard.closed(
            "unfinished_limit",
            self,
            "more than %d connections without a complete request head: the oldest closed",
            self.guard.max_unfinished,
        )


class ConnectionGuard:
    """The process's shared state for the rules above; created in the lifespan."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.loop = asyncio.get_running_loop()
        self.header_timeout = settings.header_timeout
        self.max_unfinished = settings.max_unfinished_connections
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.max_open = (
            None if soft == resource.RLIM_INFINITY else max(1, soft - settings.fd_reserve)
        )
        self.pending: dict[HeadDeadline, None] = {}  # insertion order: oldest first
        self.counter = metrics.http_connections_closed
        self.burst = BurstLog()
        self.handoff: HeadDeadline | None = None

    def admit(
        self, transport: asyncio.Transport, open_connections: int | None = None
    ) -> HeadDeadline | None:
        """A head is awaited on ``transport``: its deadline, or None if it was closed at once
        (``open_connections``, for a new connection: the file descriptor reserve is gone)."""
        if (
            open_connections is not None
            and self.max_open is not None
            and open_connections > self.max_open
        ):
            self.counter.labels("fd_limit").inc()
            self.burst.warn(
                "fd_limit",
                self.loop.time(),
                "%d connections open, near the file descriptor limit (RLIMIT_NOFILE %d): "
                "new connections are closed",
                open_connections,
                self.max_open,
            )
            transport.abort()
            return None
        deadline = HeadDeadline(self, transport)
        self.pending[deadline] = None
        if len(self.pending) > self.max_unfinished:
            oldest = next(iter(self.pending))
            self.pending.pop(oldest)
            oldest.evict()
        return deadline

    def take_handoff(self) -> HeadDeadline | None:
        """The deadline of the connection being upgraded to a websocket right now."""
        deadline, self.handoff = self.handoff, None
        return deadline

    def closed(self, reason: str, deadline: HeadDeadline, message: str, *args: object) -> None:
        self.counter.labels(reason).inc()
        self.burst.warn(reason, self.loop.time(), message, *args)
        deadline.transport.abort()


_HEAD_TOO_LARGE_TEXT = b"request head over 64 kB: refused"
HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s"
    % (len(_HEAD_TOO_LARGE_TEXT), _HEAD_TOO_LARGE_TEXT)
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on request heads (see module docstring).

    Without a ``ConnectionGuard`` in the lifespan state (an app that is not ours) it is plain
    uvicorn."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_deadline: HeadDeadline | None = None
        self.head_bytes = 0
        self.guard: ConnectionGuard | None = self.app_state.get(GUARD_STATE_KEY)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.guard is not None:
            self.head_deadline = self.guard.admit(transport, len(self.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        guard = self.guard
        if self.head_deadline is not None and guard is not None:
            self.head_bytes += len(data)  # what was read so far is (mostly) the head
            if self.head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self._head_done()
                guard.counter.labels("head_too_large").inc()
                guard.burst.warn(
                    "head_too_large",
                    guard.loop.time(),
                    "request head over %d bytes: answered 431 and closed",
                    MAX_HEAD_BYTES,
                )
                self.transport.write(HEAD_TOO_LARGE)
                self.transport.close()

    def on_message_begin(self) -> None:
        # The next request on a kept-alive connection: its head has a deadline too.
        if self.head_deadline is None and self.guard is not None:
            self.head_deadline = self.guard.admit(self.transport)
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if not (self.parser.should_upgrade() and self._should_upgrade()):
            self._head_done()  # a websocket keeps its deadline until the handshake is answered
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        """The websocket protocol created here takes the deadline over
        (``ConnectionGuard.take_handoff``) and ends it once it has answered the handshake."""
        if self.guard is None:
            super().handle_websocket_upgrade()
            return
        self.guard.handoff, self.head_deadline = self.head_deadline, None
        try:
            super().handle_websocket_upgrade()
        finally:
            self.guard.handoff = None

    def _head_done(self) -> None:
        self.head_bytes = 0
        deadline, self.head_deadline = self.head_deadline, None
        if deadline is not None:
            deadline.done()
