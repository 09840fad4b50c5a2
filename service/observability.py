"""Request ids: one per HTTP request or websocket, in every log line it causes and in the
``X-Request-ID`` response header, so a user's report can be matched to the server's log."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.chat.limits import TokenBucket

request_id: ContextVar[str] = ContextVar("request_id", default="-")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Takes a sane ``X-Request-ID`` from the client (a proxy's) or makes one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _CLIENT_ID.match(given) else uuid.uuid4().hex[:16]
        # Not reset afterwards: the server runs each request in a task of its own, and the
        # error handler outside this middleware still needs the id.
        request_id.set(rid)
        if scope["type"] == "websocket":
            # Not wrapped: every frame would pay for it. The endpoint sends the header with
            # its accept (``request_id_headers``).
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id_headers() -> list[tuple[bytes, bytes]]:
    return [(b"x-request-id", request_id.get().encode())]


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers. Tokens are already redacted upstream."""

    FIELDS = ("request_id", "user", "room", "code")
    converter: Callable[[float | None], time.struct_time] = time.gmtime  # the "Z" below means it

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in self.FIELDS:
            value = getattr(record, name, None)
            if value is not None and value != "-":
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class LogBudget:
    """At most ``rate`` lines a second (bursts of ``burst``) for what clients can cause at
    will, such as their bad input: a flood of it must not become a flood of log lines.

    ``allow`` answers whether to log this one, and counts the ones it refused; the next line
    that is logged says how many were left out (``dropped``).
    """

    __slots__ = ("_bucket", "dropped")

    def __init__(self, rate: float = 5.0, burst: float = 20.0) -> None:
        self._bucket = TokenBucket(rate, burst)
        self.dropped = 0

    def allow(self) -> bool:
        if self._bucket.try_take():
            return True
        self.dropped += 1
        return False

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped


class ClientNoise(logging.Filter):
    """uvicorn's lines about a client's malformed request ("Invalid HTTP request received.")
    come at WARNING, one per request: demoted to INFO and kept within a ``LogBudget``, like
    every other bad input a client can send at will.

    Two more come only on the public path (``service.fastpath``; the fast path's protocol does
    not log them): invalid UTF-8 in a text frame (ERROR with a traceback; reworded to the fast
    path's words), and "returned without completing handshake" (ERROR after each HTTP 429
    denial response, Kludex/uvicorn#3138: our endpoint answers every other handshake)."""

    MESSAGES = frozenset(
        {
            "Invalid HTTP request received.",
            "Unsupported upgrade request.",
            "ASGI callable returned without completing handshake.",
            "Invalid UTF-8 sequence received from client.",
        }
    )
    REWORDED = {
        "Invalid UTF-8 sequence received from client.": (
            "invalid UTF-8 in a text message; closing with 1007"
        )
    }

    def __init__(self) -> None:
        super().__init__()
        self._budget = LogBudget()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self.MESSAGES:
            return True
        if not self._budget.allow() or not logging.getLogger().isEnabledFor(logging.INFO):
            return False
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        record.msg = self.REWORDED.get(record.msg, record.msg)
        dropped = self._budget.take_dropped()
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like it not logged)"
        return True
