"""Edits and deletes: stream items that change a message, posted by websocket frames and REST
alike. Every check (the room, the caller's right to post there, the target, who may) runs in
the statement that stores the item (``chat_post_event``, migration 0006), under the room row's
lock, so it holds against concurrent changes of members and messages; nothing is checked
twice and no extra round trip is made."""

from __future__ import annotations

import asyncio
import logging
import weakref

import asyncpg

from service.chat.envelope import channel_for, encode_notification
from service.chat.messages import Publish, check_body, check_client_msg_id
from service.db import events as db
from service.db.engine import reading
from service.db.queries import MessageRecord
from service.db.writer import Stored
from service.errors import AlreadyDeleted, Forbidden, InvalidFrame, NotFound

_ERRORS = {
    "not_found": (NotFound, "no such message in this room"),
    "forbidden": (Forbidden, "only its author (a delete: also the room's owner and admins) may"),
    "already_deleted": (AlreadyDeleted, "the message is deleted"),
}

log = logging.getLogger(__name__)

_in_order: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
    weakref.WeakValueDictionary()
)
"""One author's changes in one room, stored one at a time in the order they were posted (an
asyncio lock queues its waiters first come, first served): two edits pipelined on a socket end
with the second one's text, not whichever commit wins a race on the pool."""


def check_target(target_seq: object) -> int:
    if not isinstance(target_seq, int) or isinstance(target_seq, bool) or target_seq < 1:
        raise InvalidFrame("'target_seq' must be the seq of a message (a positive integer)")
    if target_seq > 2**62:
        raise InvalidFrame("'target_seq' is out of range")
    return target_seq


async def post_event(
    pool: asyncpg.Pool,
    publish: Publish | None,
    *,
    room: str,
    room_id: int | None,
    author: str,
    admin: bool,
    kind: str,
    target_seq: object,
    body: object = None,
    client_msg_id: object = None,
    max_chars: int,
) -> Stored:
    """Validate (``InvalidMessage``) and store an ``edit`` (with ``body``) or a ``delete`` of
    message ``target_seq``; the answer is the item as a send's is the message (``Stored``: a
    repeat of ``client_msg_id`` is the original, ``duplicate``). Refusals raise ``NotFound``
    (no such room or message, or a room the caller may not see), ``Forbidden`` (not the
    author; a delete: nor an owner or admin of the room) or ``AlreadyDeleted``."""
    target = check_target(target_seq)
    text = check_body(body, max_chars=max_chars) if kind == "edit" else None
    cmid = check_client_msg_id(client_msg_id)
    channel = channel_for(room)
    lock = _in_order.get((room, author))
    if lock is None:
        lock = _in_order[(room, author)] = asyncio.Lock()
    async with lock:
        return await _post(
            pool, publish, room, room_id, channel, author, admin, kind, target, text, cmid
        )


async def _post(
    pool: asyncpg.Pool,
    publish: Publish | None,
    room: str,
    room_id: int | None,
    channel: str,
    author: str,
    admin: bool,
    kind: str,
    target: int,
    text: str | None,
    cmid: str | None,
) -> Stored:
    async with reading(pool) as conn:
        outcome = await db.post_event(
            conn,
            room=room,
            room_id=room_id,
            channel=channel,
            author=author,
            admin=admin,
            kind=kind,
            target_seq=target,
            body=text,
            client_msg_id=cmid,
            notify=publish is None,
        )
    if outcome.error is not None:
        error, detail = _ERRORS[outcome.error]
        raise error(detail)
    assert outcome.seq is not None and outcome.id is not None  # noqa: S101 - stored
    assert outcome.created_at is not None  # noqa: S101
    record = MessageRecord(outcome.id, room, outcome.seq, author, text, cmid, outcome.created_at)
    if publish is not None and outcome.frame is not None:
        try:  # as a send's: the size limit's reference, and stored is what counts
            await publish(channel, encode_notification(record, outcome.frame))
        except Exception:
            log.warning("publish failed for %s/%d; listeners will catch up", room, outcome.seq)
    return Stored(record, outcome.duplicate, outcome.frame)
