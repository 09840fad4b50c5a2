"""uvicorn's websockets-sansio protocol, made leaner per connection (thousands are idle) and
per frame (each message goes to every connection of its room).

Same protocol, same behaviour. Per connection:

* the receive queue and the "writable" gate are created lazily instead of an ``asyncio.Queue``
  (three deques) and an ``asyncio.Event`` (one deque) each;
* the handshake request and response are dropped once the handshake is answered (the
  request's headers emptied: websockets' parser generator still holds the request);
* ``DETACH`` (below) lets the app leave its routing frames behind once it has accepted.

Two fixes for what hostile clients could do to the log: invalid UTF-8 in a text message is a
client's bad input, logged at INFO without a traceback and within a per-process ``LogBudget``
(uvicorn logs each at ERROR with a traceback); and a handshake refused with a denial response
(HTTP 429) counts as answered (uvicorn logs "ASGI callable returned without completing
handshake." at ERROR for each: Kludex/uvicorn#3138).

``SEND_NOWAIT`` writes a burst of text frames in one write, without the ASGI ``send`` coroutine
and the middleware wrappers around it, whenever that ``send`` would not have waited. A
``SharedFrame`` (a message going to a whole room) is framed once and its bytes written to every
connection that negotiated no extension.

Tied to uvicorn's ``WebSocketsSansIOProtocol`` internals (``queue``, ``writable``, ``request``,
``response``, ``conn``, ``run_asgi``) and websockets' ``ServerProtocol``, written against uvicorn
0.55: imported only when ``service.fastpath`` has found them at start-up (else uvicorn's own
protocol runs, and the endpoint does without ``DETACH`` and ``SEND_NOWAIT``). CI
runs the websocket tests through this class and through uvicorn's own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, cast

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from service.chat.envelope import SharedFrame
from service.errors import InvalidUtf8
from service.http_guard import GUARD_STATE_KEY, HeadDeadline
from service.observability import LogBudget
from service.realtime.extensions import DETACH, SEND_NOWAIT

log = logging.getLogger(__name__)


class _Inbox:
    """``asyncio.Queue``'s ``put_nowait``/``get``/``empty``/``qsize`` for one consumer; no deque
    while empty."""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            if self._waiter is not None:
                raise RuntimeError("receive() called concurrently")
            if self._loop is None:  # once: get_running_loop() costs a getpid() on 3.11
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item


class _Gate:
    """``asyncio.Event``'s ``set``/``clear``/``wait``/``is_set``; waiters listed only while shut."""

    __slots__ = ("_open", "_waiters")

    def __init__(self) -> None:
        self._open = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> None:
        if self._open:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    bad_input_log: ClassVar[LogBudget | None] = None
    """One per process, like the log it protects; made at the first bad input."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Gate()  # type: ignore[assignment]
        self.head_deadline: HeadDeadline | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        guard = self.app_state.get(GUARD_STATE_KEY)
        if guard is not None:  # the HTTP protocol's deadline runs on until the handshake answer
            self.head_deadline = guard.take_handoff()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head_deadline()
        super().connection_lost(exc)

    def _end_head_deadline(self) -> None:
        deadline, self.head_deadline = self.head_deadline, None
        if deadline is not None:
            deadline.done()

    async def run_asgi(self) -> None:
        """uvicorn's ``run_asgi``, plus the continuation an app may leave with ``DETACH``."""
        detached: list[Callable[[], Awaitable[None]]] = []
        # ASGI's types say an extension is a dict; these two are this server's callables.
        extensions = cast("dict[str, object]", self.scope["extensions"])
        extensions[DETACH] = detached.append
        extensions[SEND_NOWAIT] = self.send_texts_nowait
        try:
            result = await self.app(self.scope, self.receive, self.send)
            self.scope["extensions"].pop(DETACH, None)
            if detached and result is None:
                await detached[0]()
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
        if self.close_timer is None:
            self.transport.close()

    def send_receive_event_to_app(self) -> None:
        """uvicorn's, but invalid UTF-8 goes to ``_invalid_utf8`` instead of an ERROR line."""
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # the app is past websocket.close: reads stay on for the peer's close
        if self.curr_msg_data_type == "text":
            try:
                self.queue.put_nowait({"type": "websocket.receive", "text": data.decode()})
            except UnicodeDecodeError as exc:
                self._invalid_utf8(exc)
                return
        else:
            self.queue.put_nowait({"type": "websocket.receive", "bytes": data})
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _invalid_utf8(self, exc: UnicodeDecodeError) -> None:
        """Close with 1007 as uvicorn does; log one INFO line, if the budget allows."""
        budget = LeanWebSocketProtocol.bad_input_log
        if budget is None:
            budget = LeanWebSocketProtocol.bad_input_log = LogBudget()
        if budget.allow():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            dropped = budget.take_dropped()
            log.info(
                "%s - invalid UTF-8 in a text message (%s at byte %d); closing with 1007%s",
                client,
                exc.reason,
                exc.start,
                f" ({dropped} more like it not logged)" if dropped else "",
            )
        self.conn.send_close(InvalidUtf8.close_code, "invalid UTF-8")
        self.handle_parser_exception()

    def send_texts_nowait(self, frames: Sequence[str | SharedFrame]) -> bool:
        conn = self.conn
        if (
            not self.writable.is_set()
            or not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or self.initial_response is not None
            or conn.state is not State.OPEN
            or conn.expect_continuation_frame
        ):
            return False
        chunks: list[bytes] = []
        for frame in frames:
            if isinstance(frame, str):
                conn.send_text(frame.encode())
                chunks.extend(conn.data_to_send())
            elif conn.extensions:  # e.g. compression: framed per connection
                conn.send_text(frame.text.encode())
                chunks.extend(conn.data_to_send())
            else:  # what conn.send_text would write: one final, unmasked text frame
                if frame.wire is None:
                    frame.wire = Frame(Opcode.TEXT, frame.text.encode()).serialize(
                        mask=False, extensions=[]
                    )
                chunks.append(frame.wire)
        self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        return True

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.head_deadline is not None and self.handshake_complete:
            self._end_head_deadline()  # answered: the head deadline is over
        if self.handshake_complete and getattr(self, "response", None) is not None:
            # websockets' parser generator keeps the request alive: empty its headers at least
            # (the app has its own copy in scope["headers"]).
            self.request.headers.clear()
            self.request = self.response = None  # type: ignore[assignment]
