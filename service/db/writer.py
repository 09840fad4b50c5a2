"""Group commit: the sends that arrive while a commit is in flight are stored by the next one.

One ``MessageWriter`` per process owns one asyncpg connection and one flusher task. A send is
queued and awaits its own result; the flusher takes everything queued (up to ``max_batch``),
stores it with one call of ``chat_post_messages`` (migration 0004: one statement, one
transaction, one fsync, the NOTIFYs inside) and resolves each send with its row. Under light
load a batch is one message and costs one round trip; under heavy load the fsync and the round
trip are shared. Durability is unchanged: a send resolves only after its batch committed.

Queued sends keep their order, batches commit one after another, and results are set in queue
order: a connection's sends resolve in the order it made them.

A batch that fails for a reason other than the database being unreachable is retried message
by message, so one bad message cannot fail the others.

Deadlines and outcomes (docs/protocol.md says what each answer guarantees). A send is answered
within ``deadline`` seconds (``CHAT_SEND_DEADLINE``) of the flusher taking it up: a batch's
deadline counts from the moment its oldest send may have been queued, and opening a connection,
the batch's call and its commit (one statement in autocommit: the commit happens when its Sync
is processed) all count against it. A failed batch is reported by what may have happened:

* its call was never sent (no connection, connect refused or too slow, the deadline spent in
  the queue), or the database answered it with an error (the statement rolled back): nothing
  was stored, ``Unavailable``;
* it was sent and no answer came (deadline, connection dropped, a FATAL error): the commit may
  have happened, ``OutcomeUnknown``. The client resends with the same ``client_msg_id`` and
  gets the original; every send has one, since ``submit`` assigns one (``~`` + a random
  per-writer token + a counter, a namespace clients may not invent ids in) to a send without.

After a failure other than a statement error the connection is dropped (``terminate``: nothing
waits on a dead peer) and the next batch opens a new one.

The queue is bounded: with ``queue_limit`` sends queued and not yet in a batch, ``submit``
raises ``Overloaded`` at once instead of letting sends wait for seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import asyncpg

from service.db.engine import (
    DEFAULT_KEEPALIVE,
    Keepalive,
    connect,
    is_unavailable,
    rolled_back,
)
from service.db.queries import MessageRecord
from service.errors import (
    AlreadyDeleted,
    Forbidden,
    NotFound,
    OutcomeUnknown,
    Overloaded,
    Unavailable,
)

log = logging.getLogger(__name__)

APPLICATION_NAME = "chat-service-writer"
_POST = (
    "SELECT * FROM chat_post_messages($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
    " $6::bigint[], $7::bigint[], $8)"
)
_NOTHING: tuple[object, ...] = ([], [], [], [], [], [], [], False)
"""An empty batch: run once per new connection, it prepares the statement (so a batch's call
is one Bind/Execute/Sync) and stores nothing."""

ASSIGNED_ID_PREFIX = "~"
ASSIGNED_ID_PATTERN = r"~[A-Za-z0-9_-]{12}\.[1-9][0-9]{0,18}"
"""What ``submit`` assigns: ``~``, 12 random URL-safe characters per writer, ``.``, a counter."""

_REFUSALS = {
    "forbidden": (Forbidden, "you may not post in this room"),
    "not_found": (NotFound, "no message to reply to with that seq"),
    "already_deleted": (AlreadyDeleted, "the message replied to is deleted"),
}
"""``o_error`` of ``chat_post_messages``: a send refused where it was stored."""

DEADLINE = 5.0
QUEUE_LIMIT = 2000


@dataclass(frozen=True, slots=True)
class Stored:
    message: MessageRecord
    duplicate: bool
    frame: str | None
    """The stored message's ``message`` frame, as ``chat_message_json`` (migration 0004) writes
    it: another bus publishes it, a REST post answers with it. None for a resend."""


@dataclass(slots=True)
class _Send:
    room: str
    channel: str
    author: str
    body: str
    client_msg_id: str
    room_id: int | None
    reply_to: int | None
    result: asyncio.Future[Stored]


class MessageWriter:
    def __init__(
        self,
        dsn: str,
        *,
        notify: bool,
        max_batch: int = 256,
        deadline: float = DEADLINE,
        queue_limit: int = QUEUE_LIMIT,
        keepalive: Keepalive = DEFAULT_KEEPALIVE,
        on_batch: Callable[[int], None] = lambda _size: None,
        session_settings: Mapping[str, str] | None = None,
    ) -> None:
        """``session_settings``: server settings of its connection (``engine.session_settings``:
        whether stored items are queued for the global webhook)."""
        self._dsn = dsn
        self._session_settings = dict(session_settings or {})
        self._keepalive = keepalive
        self._notify = notify
        self._max_batch = max_batch
        self._deadline = deadline
        self._queue_limit = queue_limit
        self._batch_seconds = 0.0
        """How long the last batch took: the base of ``Overloaded.retry_after``."""
        self._id_prefix = f"{ASSIGNED_ID_PREFIX}{secrets.token_urlsafe(9)}."
        self._ids = itertools.count(1)
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
        async with asyncio.timeout(self._deadline):
            self._conn = await self._open()
        self._flusher = asyncio.create_task(self._flush_forever(), name="message-writer")

    async def close(self) -> None:
        """Store what is queued (for as long as one batch may take), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._flusher is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                # Each batch answers within its deadline; what is queued behind one is
                # answered at once once its deadline is spent: a little more than one deadline.
                await asyncio.wait_for(self._flusher, self._deadline + 1)
        _fail(self._in_flight, OutcomeUnknown, "the service stopped while storing it")
        _fail(self._queue, Unavailable, "the service is shutting down")
        self._queue.clear()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2)
            self._conn = None

    def submit(
        self,
        *,
        room: str,
        channel: str,
        author: str,
        body: str,
        client_msg_id: str | None,
        room_id: int | None = None,
        reply_to: int | None = None,
    ) -> asyncio.Future[Stored]:
        """Queue a validated message; the future resolves once it is committed, or fails with
        ``Unavailable`` / ``OutcomeUnknown`` within the deadline. A full queue raises
        ``Overloaded`` here. A send without ``client_msg_id`` is given one (stored with it).

        The statement checks that the author may post (migration 0005): a private or direct
        room's member, into the room ``room_id`` names (the one the sender was admitted to;
        None: whatever room has the name, made public if none does). Otherwise the future
        fails with ``Forbidden`` and nothing is stored. ``reply_to``: the seq of a text
        message of the room it answers (``NotFound`` if there is none, ``AlreadyDeleted``)."""
        if len(self._queue) >= self._queue_limit:
            raise Overloaded(self._retry_after())
        if self._loop is None:  # once: get_running_loop() costs a getpid() on 3.11
            self._loop = asyncio.get_running_loop()
        result: asyncio.Future[Stored] = self._loop.create_future()
        if client_msg_id is None:
            client_msg_id = f"{self._id_prefix}{next(self._ids)}"
        if self._closing:
            result.set_exception(Unavailable("the service is shutting down", client_msg_id))
            return result
        self._queue.append(
            _Send(room, channel, author, body, client_msg_id, room_id, reply_to, result)
        )
        self._wakeup.set()
        return result

    def _retry_after(self) -> float:
        """Seconds until the queue has likely drained: its batches at the last batch's pace."""
        batches = 1 + len(self._queue) / self._max_batch
        return min(self._deadline, max(0.05, self._batch_seconds * batches))

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        since = loop.time()  # no send now queued was queued before this
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                since = loop.time()
                continue
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            rest = bool(self._queue)
            self._in_flight = batch
            started = loop.time()
            try:
                await self._store(batch, since + self._deadline)
            except Exception as exc:  # never lose the flusher: each send learns what happened
                log.exception("storing a batch of %d failed", len(batch))
                for send in batch:
                    if not send.result.done():
                        send.result.set_exception(exc)
            self._in_flight = []
            self._batch_seconds = loop.time() - started
            if not rest:  # what is queued now came while this batch was stored
                since = started

    async def _store(self, batch: list[_Send], deadline: float) -> None:
        try:
            rows = await self._execute(batch, deadline)
        except _Failed as failed:
            _fail(batch, failed.kind, failed.detail)
            return
        except Exception as exc:
            if len(batch) == 1:
                raise
            log.warning("a batch of %d failed (%r); storing one by one", len(batch), exc)
            for send in batch:
                try:
                    await self._store([send], deadline)
                except Exception as single:
                    log.exception("storing a message failed")
                    if not send.result.done():
                        send.result.set_exception(single)
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
            if row[7] is not None:
                error, detail = _REFUSALS[row[7]]
                send.result.set_exception(error(detail))
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

    async def _execute(self, batch: list[_Send], deadline: float) -> list[asyncpg.Record]:
        """The batch's rows; ``_Failed`` says whether it may have been stored, any other error
        is the statement's (it rolled back: nothing was stored)."""
        args = (
            [s.room for s in batch],
            [s.channel for s in batch],
            [s.author for s in batch],
            [s.body for s in batch],
            [s.client_msg_id for s in batch],
            [s.room_id for s in batch],
            [s.reply_to for s in batch],
            self._notify,
        )
        sent = False
        try:
            async with asyncio.timeout_at(deadline):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await self._open()
                if asyncio.get_running_loop().time() >= deadline:  # spent while queued
                    raise _Failed(Unavailable, "the database did not answer in time, try again")
                sent = True
                try:
                    return await self._conn.fetch(_POST, *args)
                except asyncpg.InternalClientError:
                    # Refused locally: the connection was terminated under us (its FATAL
                    # message arrived, its EOF not yet). Once more, afresh: should the first
                    # have been stored after all, every send has an id and gets the original.
                    self._drop_connection()
                    self._conn = await self._open()
                    return await self._conn.fetch(_POST, *args)
        except _Failed:
            raise
        except Exception as exc:
            if isinstance(exc, ValueError) or rolled_back(exc) and not is_unavailable(exc):
                raise  # refused by asyncpg before sending, or by the statement: not stored
            self._drop_connection()
            if not sent or rolled_back(exc):
                log.warning("a batch of %d was not stored: %r", len(batch), exc)
                raise _Failed(Unavailable, "the database is unavailable, try again") from exc
            log.warning("a batch of %d was sent, its outcome is unknown: %r", len(batch), exc)
            raise _Failed(
                OutcomeUnknown,
                "the database did not confirm the commit: the message may have been stored; "
                "resend it with the same client_msg_id",
            ) from exc

    async def _open(self) -> asyncpg.Connection:
        """A new connection, its statement prepared (by an empty batch): a batch's call is
        then one Bind/Execute/Sync, so anything that fails before it has stored nothing."""
        conn = await connect(
            self._dsn,
            APPLICATION_NAME,
            keepalive=self._keepalive,
            extra_settings=self._session_settings,
        )
        try:
            await conn.fetch(_POST, *_NOTHING)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None


class _Failed(Exception):
    """A batch that failed for want of the database; ``kind`` says what its sends are told."""

    def __init__(self, kind: type[Unavailable | OutcomeUnknown], detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _fail(batch: list[_Send], kind: type[Unavailable | OutcomeUnknown], detail: str) -> None:
    for send in batch:
        if not send.result.done():
            send.result.set_exception(kind(detail, send.client_msg_id))
