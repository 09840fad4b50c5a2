"""Posting a message: validate, store with the next seq, fan out. Websocket and REST share it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.db.queries import MessageRecord
from service.db.writer import MessageWriter
from service.errors import InvalidMessage
from service.realtime.envelope import channel_for, encode_notification

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
    writer: MessageWriter,
    room: str,
    author: str,
    body: object,
    client_msg_id: object,
    max_chars: int,
    publish: Publish | None = None,
) -> Posted:
    """Store a message and fan it out; a resend (same room, author, client_msg_id) is a no-op.

    The writer NOTIFYs in the insert transaction, so listeners hear of committed rows only and
    in seq order. With ``publish`` (a bus other than this database) the frame goes out after
    commit and the listeners' gap filling restores the order.
    """
    text = check_body(body, max_chars=max_chars)
    msg_id = check_client_msg_id(client_msg_id)
    channel = channel_for(room)
    stored = await writer.submit(
        room=room, channel=channel, author=author, body=text, client_msg_id=msg_id
    )
    if publish is not None and stored.frame is not None:
        try:
            await publish(channel, encode_notification(stored.message, stored.frame))
        except Exception:  # stored is what counts: listeners resync when the bus is back
            log.warning(
                "publish failed for %s/%d; listeners will catch up", room, stored.message.seq
            )
    return Posted(stored.message, duplicate=stored.duplicate)
