"""Storing the stream items that change a message (``chat_post_event``, migration 0006): an
edit, a delete or a reaction, one statement in one transaction under the room row's lock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.db.queries import Conn

_POST_EVENT = (
    "SELECT o_seq, o_id, o_created_at, o_frame, o_duplicate, o_error "
    "FROM chat_post_event($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """What ``chat_post_event`` answered: the stored item (``frame`` None for a repeat of a
    ``client_msg_id``, which gets the original's seq), or ``error``, a code nothing was
    stored for (``not_found``, ``forbidden``, ``already_deleted``, ``too_many_reactions``)."""

    seq: int | None
    id: int | None
    created_at: datetime | None
    frame: str | None
    duplicate: bool
    error: str | None


async def post_event(
    conn: Conn,
    *,
    room: str,
    room_id: int | None,
    channel: str,
    author: str,
    admin: bool,
    kind: str,
    target_seq: int,
    body: str | None,
    emoji: str | None,
    on: bool | None,
    client_msg_id: str | None,
    notify: bool,
) -> EventOutcome:
    row = await conn.fetchrow(
        _POST_EVENT,
        room,
        room_id,
        channel,
        author,
        admin,
        kind,
        target_seq,
        body,
        emoji,
        on,
        client_msg_id,
        notify,
    )
    assert row is not None  # noqa: S101 - the function returns one row
    return EventOutcome(*row)
