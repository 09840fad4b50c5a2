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

The protocol half runs in one of two places, as ``service.fastpath`` chose at start-up: on the
fast path, ``service.uvicorn_http`` hooks the rules into uvicorn's ``HttpToolsProtocol``
callbacks; on the public path, ``GuardedProtocol`` (below) wraps uvicorn's own protocol at
asyncio's ``Protocol`` interface and finds the end of a head in the bytes. Both hold every rule
above; ``GuardedProtocol`` says what is weaker on its side and why. A websocket handshake with a
line over websockets' limit is answered 414 or 431 on both.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from collections.abc import Collection, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
        connection = _CONNECTION.get()
        if scope["type"] != "http":
            if connection is None or connection.head_deadline is None:
                await self.app(scope, receive, send)  # websocket frames stay unwrapped
            else:  # the public path: the handshake answer ends the head deadline
                _CONNECTION.set(None)  # this task's copy: the connection is not kept for life
                await self.app(scope, receive, _answer_ends_deadline(send, connection))
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

        try:
            await self.app(scope, receive_capped, send_with_headers)
        finally:
            if connection is not None:
                connection.response_done()


def _answer_ends_deadline(send: Send, connection: GuardedProtocol) -> Send:
    """``send``, which first tells ``connection`` when the websocket handshake is answered."""

    waiting: GuardedProtocol | None = connection

    async def send_answered(message: Message) -> None:
        nonlocal waiting
        if waiting is not None and message["type"] in _HANDSHAKE_ANSWERS:
            waiting.handshake_answered()
            waiting = None  # nor is it kept by this closure
        await send(message)

    return send_answered


_HANDSHAKE_ANSWERS = frozenset(
    {"websocket.accept", "websocket.close", "websocket.http.response.start"}
)


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
        if self.transport.is_closing():  # answered by a protocol that took the connection over
            self.transport.abort()  # not counted: only made sure it goes
            return
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

    def refuse_huge_head(self, transport: asyncio.Transport) -> None:
        """A request head passed ``MAX_HEAD_BYTES``: answer 431 and close (both protocols)."""
        self.counter.labels("head_too_large").inc()
        self.burst.warn(
            "head_too_large",
            self.loop.time(),
            "request head over %d bytes: answered 431 and closed",
            MAX_HEAD_BYTES,
        )
        transport.write(HEAD_TOO_LARGE)
        transport.close()

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


def guard_of(app_state: Mapping[str, Any]) -> ConnectionGuard | None:
    """The process's guard, if the app is ours (its lifespan put one in the state)."""
    return app_state.get(GUARD_STATE_KEY)


_CONNECTION: ContextVar[GuardedProtocol | None] = ContextVar("guarded_connection", default=None)
"""The ``GuardedProtocol`` whose bytes created the running ASGI task: uvicorn starts a request's
(and a websocket's) task while it parses them, and a task copies the context it starts in. Never
set on the fast path."""


@functools.cache
def uvicorn_http_protocol(name: str) -> type[asyncio.Protocol]:
    """uvicorn's own HTTP protocol class of that name (``auto``: httptools if installed)."""
    from uvicorn.config import HTTP_PROTOCOLS  # noqa: PLC0415 - only on the public path
    from uvicorn.importer import import_from_string  # noqa: PLC0415

    protocol: type[asyncio.Protocol] = import_from_string(HTTP_PROTOCOLS[name])
    return protocol


class GuardedProtocol(asyncio.Protocol):
    """The public path's HTTP protocol: uvicorn's own (``INNER``), wrapped at asyncio's
    ``Protocol`` interface, with the rules of the module docstring. It sees bytes, not parser
    callbacks, so it finds the end of a head itself (the first blank line) and learns from
    ``GuardMiddleware`` when a response is over (the next head's deadline starts with the next
    bytes) and when a websocket handshake is answered.

    What is weaker than on the fast path, and why: it finds the guard and the connection count
    in the ``app_state`` and ``server_state`` keywords uvicorn passes to its protocols (since
    0.21); a uvicorn that stopped would leave the rules, or the fd reserve, off (the
    hostile-client tests CI runs on this path would fail). A pipelined request whose head was
    read before the previous response ended, and whose body then trickles in, may be cut off
    by a head deadline it should not have (browsers do not pipeline). A websocket handshake
    that websockets refuses for a reason other than a long line gets no answer from uvicorn's
    protocol and is closed at the head deadline."""

    INNER = "auto"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.inner = uvicorn_http_protocol(self.INNER)(*args, **kwargs)
        self.guard = guard_of(kwargs.get("app_state") or {})
        self.connections: Collection[object] | None = getattr(
            kwargs.get("server_state"), "connections", None
        )
        self.transport: asyncio.Transport | None = None
        self.head_deadline: HeadDeadline | None = None
        self.head = bytearray()
        """The unfinished head (at most ``MAX_HEAD_BYTES``), while its deadline runs."""
        self.next_head = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)
        if self.guard is not None:
            count = None if self.connections is None else len(self.connections)
            self.head_deadline = self.guard.admit(self.transport, count)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None  # noqa: S101 - asyncio calls connection_made first
        if self.next_head and self.head_deadline is None and self.guard is not None:
            self.next_head = False  # the next request on a kept-alive connection
            self.head_deadline = self.guard.admit(transport)
        head_ends = False
        if self.head_deadline is not None:
            head = self.head
            start = max(0, len(head) - 3)  # a blank line may straddle two reads
            head += data
            end = _blank_line(head, start)
            head_ends = end >= 0
            if not head_ends and len(head) > MAX_HEAD_BYTES:
                self._head_too_large(transport)
                return
            if head_ends:
                refusal = _refused_upgrade(bytes(head[:end]))
                if refusal is not None:  # what websockets would answer (uvicorn's would not)
                    self._head_done()
                    transport.write(refusal)
                    transport.close()
                    return
        token = _CONNECTION.set(self)
        try:
            self.inner.data_received(data)
        finally:
            _CONNECTION.reset(token)
        if head_ends and transport.get_protocol() is self:
            self._head_done()  # a websocket keeps its deadline until the handshake is answered

    def response_done(self) -> None:
        """From ``GuardMiddleware``: the next bytes start the next request's head."""
        self.next_head = True

    def handshake_answered(self) -> None:
        """From ``GuardMiddleware``: the websocket handshake is answered."""
        self._head_done()

    def _head_too_large(self, transport: asyncio.Transport) -> None:
        guard = self.guard
        assert guard is not None  # noqa: S101 - a deadline runs only with a guard
        self._head_done()
        if not transport.is_closing():
            guard.refuse_huge_head(transport)

    def _head_done(self) -> None:
        self.head = bytearray()
        deadline, self.head_deadline = self.head_deadline, None
        if deadline is not None:
            deadline.done()


def _blank_line(head: bytearray, start: int) -> int:
    """Where the head's first blank line starts (at or after ``start``), or -1."""
    ends = [i for i in (head.find(b"\r\n\r\n", start), head.find(b"\n\n", start)) if i >= 0]
    return min(ends) if ends else -1


def _refused_upgrade(head: bytes) -> bytes | None:
    """The fast path's answer to a websocket handshake with a line over websockets' limit
    (414 for the request line, 431 for a header or too many of them), or None. websockets'
    parser refuses such a head after uvicorn's has passed it on, and uvicorn's own protocol
    never writes that refusal: the client would wait for the head deadline instead."""
    lines = head.split(b"\n")
    if not any(
        line.lower().startswith(b"upgrade:") and b"websocket" in line.lower() for line in lines
    ):
        return None
    max_line, max_headers = _websockets_limits()
    if len(lines[0]) + 1 > max_line:
        status = b"414 URI Too Long"
    elif len(lines) - 1 > max_headers or any(len(line) + 1 > max_line for line in lines[1:]):
        status = b"431 Request Header Fields Too Large"
    else:
        return None
    text = b"websocket handshake refused: a line over %d bytes" % max_line
    return (
        b"HTTP/1.1 %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, len(text), text)
    )


def _websockets_limits() -> tuple[int, int]:
    """websockets' line and header-count limits (set by its environment variables)."""
    try:
        from websockets import http11  # noqa: PLC0415 - only on the public path

        return int(http11.MAX_LINE_LENGTH), int(http11.MAX_NUM_HEADERS)
    except (ImportError, AttributeError):
        return 8192, 128
