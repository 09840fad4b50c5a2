"""Reading history: the replay on connect, resume with ``since``, catch-up and REST pages.

Each read that pairs a room's ``last_seq`` with messages is one statement (one snapshot), so
the pair is consistent: a client that is told ``last_seq`` L has seen every message up to L.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from service.db import queries
from service.db.engine import reading
from service.db.queries import SERVICE, StoredMessage
from service.db.queries import Reader as Reader  # the readers its callers name
from service.errors import NotFound

MAX_SEQ = queries.UNBOUNDED
"""Cursors above this are refused (422) rather than overflowing PostgreSQL's bigint; both
transports declare it as their parameters' bound."""

MAX_RESUME_GAP = 1000
"""A resume replays every missed message up to this many; past it, only the latest N."""

CATCH_UP_PAGE = 500


@dataclass(frozen=True, slots=True)
class Tail:
    """The newest messages of a room after some seq, and the room's ``last_seq`` in the same
    snapshot; ``messages`` are contiguous and end at ``last_seq`` (seqs have no gaps)."""

    messages: list[StoredMessage]
    last_seq: int

    @property
    def first(self) -> int:
        """The oldest seq it holds (``last_seq + 1`` when it holds none)."""
        return self.messages[0].seq if self.messages else self.last_seq + 1


@dataclass(frozen=True, slots=True)
class Replay:
    messages: list[StoredMessage]
    last_seq: int
    recovered: bool
    room_id: int | None
    """The room read (None: no room has the name yet); with ``readable``, what the socket was
    let into, from the same snapshot as the replay."""
    readable: bool


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[StoredMessage]
    last_seq: int
    next_before: int | None
    next_after: int | None


def _readable(window: queries.Window, reader: Reader) -> bool:
    if window.room_id is None:
        return True
    return reader.everything or window.kind == "public" or window.role is not None


async def read_replay(
    *, pool: asyncpg.Pool, room: str, history: int, since: int | None, reader: Reader = SERVICE
) -> Replay:
    """What a connecting client is sent before ``ready``: with ``since`` every item it missed
    (all kinds: it applies them to what it shows), else the newest ``history`` text messages.
    Empty when ``reader`` may not read the room (``readable`` false)."""
    async with reading(pool) as conn:
        if since is not None:
            window = await queries.room_window(
                conn,
                room=room,
                after=since,
                before=None,
                limit=MAX_RESUME_GAP,
                newest=False,
                reader=reader,
            )
            if 0 <= window.last_seq - since <= MAX_RESUME_GAP:
                return _replay(window, reader, recovered=True)
        window = await queries.room_window(
            conn,
            room=room,
            after=0,
            before=None,
            limit=history,
            newest=True,
            reader=reader,
            every_kind=False,
        )
        return _replay(window, reader, recovered=False)


def _replay(window: queries.Window, reader: Reader, *, recovered: bool) -> Replay:
    readable = _readable(window, reader)
    return Replay(window.messages, window.last_seq, recovered, window.room_id, readable)


async def read_range(
    *, pool: asyncpg.Pool, room: str, after: int, until: int | None
) -> list[StoredMessage]:
    """Every item with ``after < seq <= until``: fills a gap in the live stream."""
    found: list[StoredMessage] = []
    async with reading(pool) as conn:
        while True:
            page = await queries.messages_between(
                conn, room=room, after=after, until=until, limit=CATCH_UP_PAGE
            )
            found.extend(page)
            if len(page) < CATCH_UP_PAGE:
                return found
            after = page[-1].seq


async def read_tail(
    *, pool: asyncpg.Pool, room: str, after: int, limit: int, max_bytes: int
) -> Tail:
    """The newest items with ``seq > after``: at most ``limit`` of them and ``max_bytes`` of
    JSON (but always the newest one), so a catch-up holds a bounded window in memory however
    far behind a connection is; older ones are left out (``Tail.first`` says where it starts)."""
    async with reading(pool) as conn:
        window = await queries.room_window(
            conn, room=room, after=after, before=None, limit=limit, newest=True
        )
    messages, last_seq = window.messages, window.last_seq
    size = 0
    for keep, message in enumerate(reversed(messages)):
        text = message.json
        size += len(text) if text.isascii() else len(text.encode())
        if size > max_bytes and keep:
            messages = messages[len(messages) - keep :]
            break
    if messages and messages[-1].seq - messages[0].seq != len(messages) - 1:
        keep = 1  # a hole (history deleted by hand): only what follows it is contiguous
        while keep < len(messages) and messages[-keep - 1].seq == messages[-keep].seq - 1:
            keep += 1
        messages = messages[len(messages) - keep :]
    return Tail(messages, last_seq)


async def read_page(
    *,
    pool: asyncpg.Pool,
    room: str,
    limit: int,
    before: int | None,
    after: int | None,
    reader: Reader,
    every_kind: bool,
) -> Page:
    """A REST page, ascending. With ``after`` it pages forward, otherwise backward from the end.
    ``NotFound`` for a name never used and a room the reader may not read (the same answer).

    One more item than asked is read in the direction of travel: whether it came says whether
    there is a next page (text pages skip other kinds, so seqs alone cannot tell). Toward the
    other end a cursor is given while the page does not start (end) at the room's first
    (last) seq."""
    async with reading(pool) as conn:
        window = await queries.room_window(
            conn,
            room=room,
            after=after or 0,
            before=before,
            limit=limit + 1,
            newest=after is None,
            reader=reader,
            every_kind=every_kind,
        )
    if window.room_id is None or not _readable(window, reader):
        raise NotFound("no such room")
    messages = window.messages
    more = len(messages) > limit
    if after is None:
        messages = messages[1:] if more else messages
    else:
        messages = messages[:limit]
    upper = window.last_seq if before is None else min(window.last_seq, before - 1)
    if messages:
        first, last = messages[0].seq, messages[-1].seq
        if after is None:
            next_before = first if more else None
            next_after = last if last < upper else None
        else:
            next_before = first if first > max(1, after + 1) else None
            next_after = last if more else None
    else:
        next_before = next_after = None
    return Page(messages, window.last_seq, next_before, next_after)
