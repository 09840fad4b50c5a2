"""The low level: one websocket to one room, JSON text frames, a deadline on every wait.

It adds no protocol rules (no resume, no resend): ``ChatClient`` builds those on it, and tests
that must see exact frames and close codes use it as it is. websockets' own exceptions pass
through unchanged (``InvalidStatus`` for a refused handshake, ``ConnectionClosed`` with the
close frame), so a caller can read the status, body and close code the server sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

DEFAULT_TIMEOUT = 10.0
NO_CLOSE = 1006
"""The close code of a connection that ended without a close frame (RFC 6455)."""


def ws_base(url: str) -> str:
    """``http(s)://host[:port][/prefix]`` -> ``ws(s)://...``: one base URL serves REST and the
    websocket, as behind one load balancer."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"not an http(s) or ws(s) URL: {url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def http_base(url: str) -> str:
    """The inverse of ``ws_base``."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"not an http(s) or ws(s) URL: {url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def room_url(base: str, room: str, **params: Any) -> str:
    """The websocket URL of ``room``; parameters that are None are left out."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    url = f"{ws_base(base)}/ws/rooms/{quote(room, safe='')}"
    return f"{url}?{query}" if query else url


def close_code(exc: ConnectionClosed) -> tuple[int, str]:
    """The code and reason the server closed with; 1006 when no close frame came."""
    if exc.rcvd is not None:
        return exc.rcvd.code, exc.rcvd.reason
    return NO_CLOSE, ""


class Connection:
    """A websocket speaking the protocol's JSON frames; ``ws`` is websockets' connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
        sock: socket.socket | None = None,
        compression: Literal["deflate"] | None = "deflate",
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float = DEFAULT_TIMEOUT,
    ) -> Connection:
        """Open ``url``; ``token`` goes in ``Authorization`` (a query ``?token=`` is the
        caller's choice). websockets' keepalive pings every ``ping_interval`` and drops a
        connection whose pong is ``ping_timeout`` late: a path that went silent is noticed."""
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await asyncio.wait_for(
            connect(
                url,
                additional_headers=headers,
                open_timeout=timeout,
                sock=sock,
                compression=compression,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
                close_timeout=close_timeout,
                proxy=None,
            ),
            timeout,
        )
        return cls(ws)

    async def recv(self, timeout: float | None = DEFAULT_TIMEOUT) -> dict[str, Any]:  # noqa: ASYNC109
        """The next frame, decoded; ``TimeoutError`` when none came in ``timeout`` seconds
        (None: as long as keepalive pings say the connection lives)."""
        text = await asyncio.wait_for(self.ws.recv(), timeout)
        frame = json.loads(text)
        if not isinstance(frame, dict):
            raise ValueError(f"not a JSON object: {text!r}")
        return frame

    async def send(self, frame: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> None:  # noqa: ASYNC109
        # ASCII JSON: a lone surrogate (which a test may send on purpose) travels as an escape.
        await asyncio.wait_for(self.ws.send(json.dumps(frame)), timeout)

    def abort(self) -> None:
        """Drop the TCP connection at once: for a path that stopped answering, where a close
        handshake would only wait out its timeout."""
        self.ws.transport.abort()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close; frames left unread are read and dropped meanwhile: past websockets'
        ``max_queue`` the client stops reading its socket, and the server's close frame
        would wait behind them until ``close_timeout``."""
        drain = asyncio.create_task(self._discard_until_closed())
        try:
            await self.ws.close(code, reason)
        finally:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)

    async def _discard_until_closed(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.ws.recv()
