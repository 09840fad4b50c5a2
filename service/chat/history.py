"""Reading history: the replay on connect, resume with ``since``, catch-up and REST pages.

Each read that pairs a room's ``last_seq`` with messages runs in one REPEATABLE READ snapshot,
so the pair is consistent: a client that is told ``last_seq`` L has seen every message up to L.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from service.db import queries
from service.db.engine import translate_db_errors
from service.db.queries import MessageRecord

MAX_RESUME_GAP = 1000
"""A resume replays every missed message up to this many; past it, only the latest N."""

CATCH_UP_PAGE = 500


@dataclass(frozen=True, slots=True)
class Replay:
    messages: list[MessageRecord]
    last_seq: int
    recovered: bool


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[MessageRecord]
    last_seq: int
    next_before: int | None
    next_after: int | None


async def _snapshot(session: AsyncSession) -> None:
    await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


async def read_replay(
    *, session: AsyncSession, room: str, history: int, since: int | None
) -> Replay:
    """What a connecting client is sent before ``ready``."""
    with translate_db_errors():
        try:
            await _snapshot(session)
            last_seq = await queries.room_last_seq(session, room=room)
            if since is not None and 0 <= last_seq - since <= MAX_RESUME_GAP:
                missed = await queries.messages_between(
                    session, room=room, after=since, until=last_seq, limit=MAX_RESUME_GAP
                )
                return Replay(missed, last_seq, recovered=True)
            latest = (
                await queries.messages_before(
                    session, room=room, before=None, after=0, limit=history
                )
                if history
                else []
            )
            return Replay(latest, last_seq, recovered=False)
        finally:
            await session.rollback()


async def read_range(
    *, session: AsyncSession, room: str, after: int, until: int | None
) -> list[MessageRecord]:
    """Every message with ``after < seq <= until``: fills a gap in the live stream."""
    with translate_db_errors():
        try:
            found: list[MessageRecord] = []
            while True:
                page = await queries.messages_between(
                    session, room=room, after=after, until=until, limit=CATCH_UP_PAGE
                )
                found.extend(page)
                if len(page) < CATCH_UP_PAGE:
                    return found
                after = page[-1].seq
        finally:
            await session.rollback()


async def read_page(
    *, session: AsyncSession, room: str, limit: int, before: int | None, after: int | None
) -> Page:
    """A REST page, ascending. With ``after`` it pages forward, otherwise backward from the end.

    Seqs have no gaps, so "is there an older page" is just "does this page start above 1".
    """
    with translate_db_errors():
        try:
            await _snapshot(session)
            last_seq = await queries.room_last_seq(session, room=room)
            if after is not None:
                messages = await queries.messages_between(
                    session,
                    room=room,
                    after=after,
                    until=None if before is None else before - 1,
                    limit=limit,
                )
            else:
                messages = await queries.messages_before(
                    session, room=room, before=before, after=0, limit=limit
                )
        finally:
            await session.rollback()
    upper = last_seq if before is None else min(last_seq, before - 1)
    if messages:
        first, last = messages[0].seq, messages[-1].seq
        next_before = first if first > max(1, (after or 0) + 1) else None
        next_after = last if last < upper else None
    else:
        next_before = next_after = None
    return Page(messages, last_seq, next_before, next_after)
