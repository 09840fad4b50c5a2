"""Group commit: the sends that arrive while a commit is in flight are stored by the next one.

One ``MessageWriter`` per process owns one asyncpg connection and one flusher task. A send is
queued and awaits its own result; the flusher takes everything queued (up to ``max_batch``),
stores it with one call of ``chat_post_messages`` (migration 0003: one statement, one
transaction, one fsync, the NOTIFYs inside) and resolves each send with its row. Under light
load a batch is one message and costs one round trip; under heavy load the fsync and the round
trip are shared. Durability is unchanged: a send resolves only after its batch committed.

Queued sends keep their order, batches commit one after another, and results are set in queue
order: a connection's sends resolve in the order it made them.

A batch that fails for a reason other than the database being unreachable is retried message
by message, so one bad message cannot fail the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from service.db.engine import TIMEOUT, connect, is_unavailable
from service.db.queries import MessageRecord
from service.errors import Unavailable

log = logging.getLogger(__name__)

APPLICATION_NAME = "chat-service-writer"
_POST = (
    "SELECT * FROM chat_post_messages($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
    " $6)"
)


@dataclass(frozen=True, slots=True)
class Stored:
    message: MessageRecord
    duplicate: bool
    frame: str | None
    """The ``message`` frame when the writer did not NOTIFY it (another bus publishes it)."""


@dataclass(slots=True)
class _Send:
    room: str
    channel: str
    author: str
    body: str
    client_msg_id: str | None
    result: asyncio.Future[Stored]


class MessageWriter:
    def __init__(
        self,
        dsn: str,
        *,
        notify: bool,
        max_batch: int = 256,
        timeout: float = TIMEOUT,
        on_batch: Callable[[int], None] = lambda _size: None,
    ) -> None:
        self._dsn = dsn
        self._notify = notify
        self._max_batch = max_batch
        self._timeout = timeout
        self._queue: list[_Send] = []
        self._wakeup = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._on_batch = on_batch
        self._closing = False
        self._in_flight: list[_Send] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Connect now (a wrong DSN fails at start-up, not at the first send) and flush."""
        self._conn = await connect(self._dsn, APPLICATION_NAME)
        self._flusher = asyncio.create_task(self._flush_forever(), name="message-writer")

    async def close(self) -> None:
        """Store what is queued (for as long as one batch may take), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._flusher is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._flusher, self._timeout)
        _fail(self._in_flight + self._queue, Unavailable("the service is shutting down"))
        self._queue.clear()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2)
            self._conn = None

    def submit(
        self, *, room: str, channel: str, author: str, body: str, client_msg_id: str | None
    ) -> asyncio.Future[Stored]:
        """Queue a validated message; the future resolves once it is committed."""
        if self._loop is None:  # once: get_running_loop() costs a getpid() on 3.11
            self._loop = asyncio.get_running_loop()
        result: asyncio.Future[Stored] = self._loop.create_future()
        if self._closing:
            result.set_exception(Unavailable("the service is shutting down"))
            return result
        self._queue.append(_Send(room, channel, author, body, client_msg_id, result))
        self._wakeup.set()
        return result

    async def _flush_forever(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            self._in_flight = batch
            try:
                await self._store(batch)
            except Exception as exc:  # never lose the flusher: each send learns what happened
                log.exception("storing a batch of %d failed", len(batch))
                _fail(batch, exc)

    async def _store(self, batch: list[_Send]) -> None:
        try:
            rows = await self._execute(batch)
        except Exception as exc:
            if is_unavailable(exc):
                self._drop_connection()
                _fail(batch, Unavailable("the database is unavailable, try again"))
                return
            if len(batch) == 1:
                raise
            log.warning("a batch of %d failed (%r); storing one by one", len(batch), exc)
            for send in batch:
                try:
                    await self._store([send])
                except Exception as single:
                    log.exception("storing a message failed")
                    _fail([send], single)
            return
        self._on_batch(len(batch))
        by_ord = {row[0]: row for row in rows}
        for ord_, send in enumerate(batch, 1):
            row = by_ord.get(ord_)
            if send.result.done():  # the sender went away; the message is stored all the same
                continue
            if row is None:
                send.result.set_exception(RuntimeError("the batch returned no row for a send"))
                continue
            duplicate = row[5]
            message = MessageRecord(
                row[1],
                send.room,
                row[2],
                send.author,
                row[3] if duplicate else send.body,
                send.client_msg_id,
                row[4],
            )
            send.result.set_result(Stored(message, duplicate, row[6]))

    async def _execute(self, batch: list[_Send]) -> list[asyncpg.Record]:
        args = (
            [s.room for s in batch],
            [s.channel for s in batch],
            [s.author for s in batch],
            [s.body for s in batch],
            [s.client_msg_id for s in batch],
            self._notify,
        )
        try:
            return await self._fetch(args)
        except asyncpg.InternalClientError:
            # Refused locally: the connection was terminated under us (its FATAL message
            # arrived, its EOF not yet) and the batch was never sent. Once more, afresh.
            self._drop_connection()
            return await self._fetch(args)

    async def _fetch(self, args: tuple[object, ...]) -> list[asyncpg.Record]:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self._dsn, APPLICATION_NAME)
        return await self._conn.fetch(_POST, *args, timeout=self._timeout)

    def _drop_connection(self) -> None:
        """The outcome of the batch is unknown: its senders retry with their client_msg_id."""
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None


def _fail(batch: list[_Send], exc: BaseException) -> None:
    for send in batch:
        if not send.result.done():
            send.result.set_exception(exc)
