"""Posting a message: validate, store with the next seq, fan out. Websocket and REST share it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from service.db import queries
from service.db.engine import translate_db_errors
from service.db.queries import MessageRecord
from service.errors import InvalidMessage
from service.realtime.envelope import channel_for, encode_notification, message_frame

log = logging.getLogger(__name__)

MAX_CLIENT_MSG_ID_CHARS = 128

Publish = Callable[[str, str], Awaitable[None]]
"""``publish(channel, payload)`` after commit, for a broadcast bus other than the database."""


@dataclass(frozen=True, slots=True)
class Posted:
    message: MessageRecord
    duplicate: bool


def check_body(body: object, *, max_chars: int) -> str:
    if not isinstance(body, str):
        raise InvalidMessage("invalid_frame", "'body' must be a string")
    if not body.strip():
        raise InvalidMessage("empty_body", "the message body is empty")
    if len(body) > max_chars:
        raise InvalidMessage(
            "body_too_long", f"the message body is {len(body)} characters; the limit is {max_chars}"
        )
    if "\x00" in body:
        raise InvalidMessage("invalid_body", "the message body must not contain NUL characters")
    try:
        body.encode()
    except UnicodeEncodeError:
        raise InvalidMessage("invalid_body", "the message body is not valid Unicode") from None
    return body


def check_client_msg_id(client_msg_id: object) -> str | None:
    if client_msg_id is None:
        return None
    if (
        not isinstance(client_msg_id, str)
        or not 0 < len(client_msg_id) <= MAX_CLIENT_MSG_ID_CHARS
        or not client_msg_id.isprintable()
    ):
        raise InvalidMessage(
            "invalid_client_msg_id",
            "'client_msg_id' must be a printable string of 1 to "
            f"{MAX_CLIENT_MSG_ID_CHARS} characters",
        )
    return client_msg_id


async def post_message(
    *,
    session: AsyncSession,
    room: str,
    author: str,
    body: object,
    client_msg_id: object,
    max_chars: int,
    publish: Publish | None = None,
) -> Posted:
    """Store a message and fan it out; a resend (same room, author, client_msg_id) is a no-op.

    The NOTIFY goes out in the insert transaction, so listeners hear of committed rows only and
    in seq order. With ``publish`` (a bus other than this database) it goes out after commit and
    the listeners' gap filling restores the order.
    """
    text = check_body(body, max_chars=max_chars)
    msg_id = check_client_msg_id(client_msg_id)
    with translate_db_errors():
        try:
            record = await queries.insert_message(
                session, room=room, author=author, body=text, client_msg_id=msg_id
            )
            if record is None:
                await session.rollback()  # give back the seq the resend bumped
                assert msg_id is not None  # noqa: S101 - only a client_msg_id can conflict
                original = await queries.find_by_client_msg_id(
                    session, room=room, author=author, client_msg_id=msg_id
                )
                if original is None:
                    raise RuntimeError("conflicting message vanished")
                return Posted(original, duplicate=True)
            channel = channel_for(room)
            payload = encode_notification(record, message_frame(record))
            if publish is None:
                await queries.notify(session, channel=channel, payload=payload)
            await session.commit()
        finally:
            await session.rollback()
    if publish is not None:
        try:
            await publish(channel, payload)
        except Exception:  # stored is what counts: listeners resync when the bus is back
            log.warning("publish failed for %s/%d; listeners will catch up", room, record.seq)
    return Posted(record, duplicate=False)
