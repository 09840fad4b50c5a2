"""Reading history: the replay on connect, resume with ``since``, catch-up and REST pages.

Each read that pairs a room's ``last_seq`` with messages is one statement (one snapshot), so
the pair is consistent: a client that is told ``last_seq`` L has seen every message up to L.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from service.db import queries
from service.db.engine import reading
from service.db.queries import StoredMessage

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


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[StoredMessage]
    last_seq: int
    next_before: int | None
    next_after: int | None


async def read_replay(*, pool: asyncpg.Pool, room: str, history: int, since: int | None) -> Replay:
    """What a connecting client is sent before ``ready``."""
    async with reading(pool) as conn:
        if since is not None:
            last_seq, missed = await queries.room_window(
                conn, room=room, after=since, before=None, limit=MAX_RESUME_GAP, newest=False
            )
            if 0 <= last_seq - since <= MAX_RESUME_GAP:
                return Replay(missed, last_seq, recovered=True)
        last_seq, latest = await queries.room_window(
            conn, room=room, after=0, before=None, limit=history, newest=True
        )
        return Replay(latest, last_seq, recovered=False)


async def read_range(
    *, pool: asyncpg.Pool, room: str, after: int, until: int | None
) -> list[StoredMessage]:
    """Every message with ``after < seq <= until``: fills a gap in the live stream."""
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
    """The newest messages with ``seq > after``: at most ``limit`` of them and ``max_bytes`` of
    JSON (but always the newest one), so a catch-up holds a bounded window in memory however
    far behind a connection is; older ones are left out (``Tail.first`` says where it starts)."""
    async with reading(pool) as conn:
        last_seq, messages = await queries.room_window(
            conn, room=room, after=after, before=None, limit=limit, newest=True
        )
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
    *, pool: asyncpg.Pool, room: str, limit: int, before: int | None, after: int | None
) -> Page:
    """A REST page, ascending. With ``after`` it pages forward, otherwise backward from the end.

    Seqs have no gaps, so "is there an older page" is just "does this page start above 1".
    """
    async with reading(pool) as conn:
        last_seq, messages = await queries.room_window(
            conn,
            room=room,
            after=after or 0,
            before=before,
            limit=limit,
            newest=after is None,
        )
    upper = last_seq if before is None else min(last_seq, before - 1)
    if messages:
        first, last = messages[0].seq, messages[-1].seq
        next_before = first if first > max(1, (after or 0) + 1) else None
        next_after = last if last < upper else None
    else:
        next_before = next_after = None
    return Page(messages, last_seq, next_before, next_after)


async def list_rooms(
    *, pool: asyncpg.Pool, after: str | None, limit: int
) -> list[queries.RoomRecord]:
    async with reading(pool) as conn:
        return await queries.list_rooms(conn, after=after, limit=limit)
