"""A real HTTP receiver for webhook tests: ``asyncio.start_server`` on a port of its own, HTTP/1.1
with keep-alive, as little as a receiver needs. Each request's raw body and headers are kept;
the test decides the answer (``answer``), can take the receiver down (connections refused) and
bring it back on the same port, and sees how many requests were in flight at once per room."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int
    at: float = field(default_factory=time.monotonic)

    @property
    def item(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300) -> bool:
    """The check docs/webhooks.md tells receivers to make, written from the doc, not from the
    service's code."""
    parts = dict(p.split("=", 1) for p in header.split(","))
    timestamp = int(parts["t"])
    if abs(time.time() - timestamp) > tolerance:
        return False
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])


Answer = Callable[[Received], Awaitable[int] | int]


class Receiver:
    def __init__(self, answer: Answer | None = None) -> None:
        self.answer: Answer = answer or (lambda _r: 200)
        self.requests: list[Received] = []
        self.in_flight: dict[str, int] = {}
        """Requests being answered now, per room."""
        self.max_in_flight_per_room = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.arrived = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Down: the port refuses connections, and open ones are cut."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    def delivered(self) -> list[Received]:
        return [r for r in self.requests if 200 <= r.status < 300]

    def delivered_items(self, room: str | None = None) -> list[dict[str, Any]]:
        items = [r.item for r in self.delivered()]
        return [i for i in items if room is None or i["room"] == room]

    async def wait_for(self, check: Callable[[], bool], timeout: float = 20) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(check), timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                room = json.loads(body).get("room", "") if body else ""
                self.in_flight[room] = self.in_flight.get(room, 0) + 1
                self.max_in_flight_per_room = max(self.max_in_flight_per_room, self.in_flight[room])
                async with self.arrived:  # a wait on in_flight sees a request that hangs
                    self.arrived.notify_all()
                received = Received(headers, body, 0)
                try:
                    status = self.answer(received)
                    if not isinstance(status, int):
                        status = await status
                finally:
                    self.in_flight[room] -= 1
                received.status = status
                self.requests.append(received)
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok".encode())
                await writer.drain()
                async with self.arrived:
                    self.arrived.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()
