"""Read cursors: how far each member has read, moved by ``read`` frames and ``PUT .../read``.

Every socket of a room may say once a second how far its user has read; a write each would cost
the database more than the messages. So each process keeps the highest seq per (room, user)
it was told and moves them all every ``interval`` seconds (``CHAT_READ_FLUSH_INTERVAL``) with
one ``chat_mark_read`` (migration 0007): forward only, members only, at most to the room's end.
A crash loses at most one interval of ``read`` frames: a client repeats its cursor as it reads.

A cursor that moved is a signal (../shared/DESIGN.md: no seq, never stored) on the room's
channel, so every replica delivers it: a ``read`` frame to the same user's sockets of the room
(their other devices), and, in a room of at most ``receipts_max`` members
(``CHAT_RECEIPTS_MAX_MEMBERS``), a ``receipt`` frame to the other users' sockets, at most one
per user and room per second from this process (the last position always goes out). With
LISTEN/NOTIFY the signals are NOTIFYed in the transaction that moved the cursors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg

from service.chat import rooms
from service.chat.envelope import channel_for, dumps, encode_signal
from service.chat.messages import Publish
from service.db import rooms as db
from service.db.engine import reading
from service.errors import Forbidden

log = logging.getLogger(__name__)

RECEIPT_INTERVAL = 1.0
"""Seconds between two receipts of one user in one room from one process."""

Mark = tuple[str, str]
"""(room, user)."""


def read_frame(room: str, seq: int) -> str:
    return dumps({"type": "read", "room": room, "seq": seq})


def receipt_frame(room: str, user: str, seq: int) -> str:
    return dumps({"type": "receipt", "room": room, "user": user, "seq": seq})


class ReadCursors:
    def __init__(
        self,
        pool: asyncpg.Pool,
        publish: Publish | None,
        *,
        interval: float,
        receipts_max: int,
    ) -> None:
        self._pool = pool
        self._publish = publish
        """None: NOTIFY in the transaction (the database is the bus)."""
        self._interval = interval
        self._receipts_max = receipts_max
        self._pending: dict[Mark, int] = {}
        self._receipt_sent: dict[Mark, float] = {}
        """When this process last sent a receipt of (room, user)."""
        self._receipt_due: dict[Mark, int] = {}
        """Receipts held back by ``RECEIPT_INTERVAL``: the newest seq of each."""
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        """One move at a time: the flusher's and REST's never race on the same rows."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="read-cursors")

    async def close(self) -> None:
        """Move what was marked (within a deadline), then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._pending:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._flush()

    def mark(self, room: str, user: str, seq: int) -> None:
        """Remember that ``user`` has read ``room`` up to ``seq``; moved at the next flush."""
        key = (room, user)
        if seq > self._pending.get(key, -1):
            self._pending[key] = seq
            self._wakeup.set()

    async def move_now(self, room: str, user: str, seq: int) -> None:
        """Move one cursor at once (``PUT /rooms/{room}/read``), with its signals. Raises
        ``Unavailable`` when the database is out."""
        await self._move({(room, user): seq})

    async def _flush_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(self._interval)  # what comes meanwhile goes in the same move
            self._wakeup.clear()
            try:
                await self._flush()
            except Exception:  # the database is out (or a bug): marks are kept, tried again
                log.warning("moving read cursors failed; retrying", exc_info=True)
                self._wakeup.set()
                await asyncio.sleep(self._interval * 4)
            if self._receipt_due:
                self._wakeup.set()

    async def _flush(self) -> None:
        marks, self._pending = self._pending, {}
        try:
            await self._move(marks)
        except BaseException:
            for key, seq in marks.items():  # back, unless a newer mark came meanwhile
                if seq > self._pending.get(key, -1):
                    self._pending[key] = seq
            raise

    async def _move(self, marks: dict[Mark, int]) -> None:
        async with self._lock:
            now = time.monotonic()
            for key, sent in list(self._receipt_sent.items()):
                if now - sent >= RECEIPT_INTERVAL:
                    del self._receipt_sent[key]
            if not marks and all(key in self._receipt_sent for key in self._receipt_due):
                return  # nothing to move, no receipt to send yet
            async with reading(self._pool) as conn, conn.transaction():
                moved = []
                if marks:
                    moved = await db.mark_read(
                        conn,
                        marks=[(room, user, seq) for (room, user), seq in marks.items()],
                        receipts_max=self._receipts_max,
                    )
                signals = self._signals(moved, now)
                if self._publish is None:
                    await db.notify_all(conn, signals)
            if self._publish is not None:
                for channel, payload in signals:
                    await self._publish(channel, payload)

    def _signals(self, moved: list[db.CursorMoved], now: float) -> list[tuple[str, str]]:
        """The payloads of the cursors that moved, and of receipts held back until now."""
        signals = []
        for cursor in moved:
            channel = channel_for(cursor.room)
            frame = read_frame(cursor.room, cursor.seq)
            signals.append((channel, encode_signal(frame, to=cursor.user)))
            if cursor.receipts:
                self._receipt_due[(cursor.room, cursor.user)] = cursor.seq
        for key, seq in list(self._receipt_due.items()):
            if key in self._receipt_sent:
                continue  # sent within the interval: goes out once it has passed
            room, user = key
            frame = receipt_frame(room, user, seq)
            signals.append((channel_for(room), encode_signal(frame, but=user)))
            self._receipt_sent[key] = now
            del self._receipt_due[key]
        return signals


async def move_cursor(
    pool: asyncpg.Pool, cursors: ReadCursors, *, caller: rooms.Caller, room: str, seq: int
) -> None:
    """The caller's cursor in the room to ``seq`` (forward only, at most the room's end), at
    once. ``NotFound`` for a room they cannot see, ``Forbidden`` when they are not a member
    (only members have a cursor)."""
    row = await rooms.get_room(pool, room=room, caller=caller)
    if row.role is None:
        raise Forbidden("only the room's members have a read cursor")
    await cursors.move_now(room, caller.user, seq)
