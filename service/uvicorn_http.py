"""The fast path's HTTP protocol: uvicorn's ``HttpToolsProtocol`` with the head deadline, the
unfinished-connection cap, the 431 for huge heads and the file descriptor reserve of
``service.http_guard`` hooked into its parser callbacks.

Tied to uvicorn's internals (``connection_made``, ``on_message_begin``, ``on_headers_complete``,
``handle_websocket_upgrade``, ``_should_upgrade``, ``app_state``, ``connections``), written
against uvicorn 0.55: imported only when ``service.fastpath`` has checked them, else
``service.http_guard.GuardedProtocol`` wraps uvicorn's own protocol instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.http_guard import (
    MAX_HEAD_BYTES,
    ConnectionGuard,
    HeadDeadline,
    guard_of,
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on request heads (see module docstring).

    Without a ``ConnectionGuard`` in the lifespan state (an app that is not ours) it is plain
    uvicorn."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_deadline: HeadDeadline | None = None
        self.head_bytes = 0
        self.guard: ConnectionGuard | None = guard_of(self.app_state)

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
                guard.refuse_huge_head(self.transport)

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
