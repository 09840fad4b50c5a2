"""Posting a message: validate, store with the next seq, fan out. Websocket and REST share it."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

from service.chat.envelope import channel_for, encode_notification
from service.chat.history import MAX_SEQ
from service.db.writer import ASSIGNED_ID_PATTERN, ASSIGNED_ID_PREFIX, MessageWriter, Stored
from service.errors import (
    BodyTooLong,
    EmptyBody,
    InvalidBody,
    InvalidClientMsgId,
    InvalidFrame,
)

log = logging.getLogger(__name__)

MAX_CLIENT_MSG_ID_CHARS = 128
_ASSIGNED_ID = re.compile(ASSIGNED_ID_PATTERN)

Publish = Callable[[str, str], Awaitable[None]]
"""``publish(channel, payload)`` after commit, for a broadcast bus other than the database."""


def check_body(body: object, *, max_chars: int) -> str:
    if not isinstance(body, str):
        raise InvalidFrame("'body' must be a string")
    if not body.strip():
        raise EmptyBody("the message body is empty")
    if len(body) > max_chars:
        raise BodyTooLong(f"the message body is {len(body)} characters; the limit is {max_chars}")
    if "\x00" in body:
        raise InvalidBody("the message body must not contain NUL characters")
    try:
        body.encode()
    except UnicodeEncodeError:
        raise InvalidBody("the message body is not valid Unicode") from None
    return body


def check_client_msg_id(client_msg_id: object) -> str | None:
    if client_msg_id is None:
        return None
    if (
        not isinstance(client_msg_id, str)
        or not 0 < len(client_msg_id) <= MAX_CLIENT_MSG_ID_CHARS
        or not client_msg_id.isprintable()
    ):
        raise InvalidClientMsgId(
            "'client_msg_id' must be a printable string of 1 to "
            f"{MAX_CLIENT_MSG_ID_CHARS} characters",
        )
    if client_msg_id[0] == ASSIGNED_ID_PREFIX and not _ASSIGNED_ID.fullmatch(client_msg_id):
        # Ids the server assigns start with "~": a client sends one only to retry the send it
        # was given for, so its own ids can never collide with one the server made up.
        raise InvalidClientMsgId(
            f"a 'client_msg_id' starting with {ASSIGNED_ID_PREFIX!r} is reserved for the ids "
            "the server assigns",
        )
    return client_msg_id


def check_seq(value: object, field: str) -> int:
    """A frame's reference to a message of the room: a positive integer (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SEQ:
        raise InvalidFrame(f"'{field}' must be the seq of a message (a positive integer)")
    return value


def check_reply_to(reply_to: object) -> int | None:
    return None if reply_to is None else check_seq(reply_to, "reply_to")


def submit_message(
    *,
    writer: MessageWriter,
    room: str,
    author: str,
    body: object,
    client_msg_id: object,
    max_chars: int,
    publish: Publish | None = None,
    room_id: int | None = None,
    reply_to: object = None,
) -> asyncio.Future[Stored]:
    """Validate (``InvalidMessage`` at once) and queue a message for the next group commit
    (``Overloaded`` at once when the writer's queue is full).

    The future resolves once the message is committed; a resend (same room, author,
    client_msg_id) resolves to the original, marked ``duplicate``; a send without one is given
    one by the writer. The future fails with ``Unavailable`` (nothing stored) or
    ``OutcomeUnknown`` (maybe stored), both naming the id, within the send deadline. The
    writer NOTIFYs in the insert transaction, so listeners hear of committed rows only and in
    seq order. The statement refuses an author who may not post in the room (``Forbidden``:
    not a member of a private or direct room; ``room_id``, the room the sender was admitted
    to, is gone). With ``publish`` (a bus other than this database) the frame goes out after
    commit and the listeners' gap filling restores the order.
    """
    text = check_body(body, max_chars=max_chars)
    msg_id = check_client_msg_id(client_msg_id)
    replied = check_reply_to(reply_to)
    channel = channel_for(room)
    stored = writer.submit(
        room=room,
        channel=channel,
        author=author,
        body=text,
        client_msg_id=msg_id,
        room_id=room_id,
        reply_to=replied,
    )
    if publish is None:
        return stored
    return asyncio.ensure_future(_publish_after_commit(stored, publish, channel))


async def _publish_after_commit(
    stored: asyncio.Future[Stored], publish: Publish, channel: str
) -> Stored:
    result = await stored
    if result.frame is not None:
        try:
            await publish(channel, encode_notification(result.message.seq, result.frame))
        except Exception:  # stored is what counts: listeners resync when the bus is back
            log.warning(
                "publish failed for %s/%d; listeners will catch up",
                result.message.room,
                result.message.seq,
            )
    return result
