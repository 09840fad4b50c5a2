"""Edits, deletes and reactions: stream items that change a message, posted by websocket
frames and REST alike. Every check (the room, the caller's right to post there, the target,
who may) runs in the statement that stores the item (``chat_post_event``, migration 0006),
under the room row's lock, so it holds against concurrent changes of members and messages;
nothing is checked twice and no extra round trip is made."""

from __future__ import annotations

import logging

import asyncpg

from service.chat.envelope import channel_for, encode_notification
from service.chat.messages import Publish, check_body, check_client_msg_id, check_seq
from service.db import events as db
from service.db.engine import reading, rolled_back
from service.db.queries import MessageRecord
from service.db.writer import Stored
from service.errors import (
    AlreadyDeleted,
    Forbidden,
    InvalidEmoji,
    InvalidFrame,
    NotFound,
    OutcomeUnknown,
    TooManyReactions,
    Unavailable,
)

log = logging.getLogger(__name__)

MAX_DISTINCT_REACTIONS = 20
"""Different emoji on one message (migration 0006 holds the same number)."""
MAX_EMOJI_CODE_POINTS = 32

_ERRORS = {
    "not_found": (NotFound, "no such message in this room"),
    "forbidden": (Forbidden, "only its author (a delete: also the room's owner and admins) may"),
    "already_deleted": (AlreadyDeleted, "the message is deleted"),
    "too_many_reactions": (
        TooManyReactions,
        f"a message takes at most {MAX_DISTINCT_REACTIONS} different emoji",
    ),
}

_PICTOGRAPHIC = (
    (0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049),
    (0x2122, 0x2122), (0x2139, 0x2139), (0x2194, 0x2199), (0x21A9, 0x21AA),
    (0x231A, 0x231B), (0x2328, 0x2328), (0x23CF, 0x23CF), (0x23E9, 0x23F3),
    (0x23F8, 0x23FA), (0x24C2, 0x24C2), (0x25AA, 0x25AB), (0x25B6, 0x25B6),
    (0x25C0, 0x25C0), (0x25FB, 0x25FE), (0x2600, 0x27BF), (0x2934, 0x2935),
    (0x2B05, 0x2B07), (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55),
    (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299),
    (0x1F000, 0x1F1E5), (0x1F200, 0x1F3FA), (0x1F400, 0x1FAFF),
)  # fmt: skip
"""Unicode's emoji (Extended_Pictographic, approximately: every assigned emoji is in these
ranges; some unassigned code points are too, which a client cannot render anyway)."""
_ZWJ, _VS16, _KEYCAP, _TAG_END = 0x200D, 0xFE0F, 0x20E3, 0xE007F
_KEYCAP_BASES = "0123456789#*"
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_REGIONAL = range(0x1F1E6, 0x1F200)
_TAGS = range(0xE0020, 0xE007F)


def _pictographic(cp: int) -> bool:
    return any(low <= cp <= high for low, high in _PICTOGRAPHIC)


def _element(points: list[int]) -> bool:
    """One element of a ZWJ sequence: an emoji, then an optional presentation selector, a
    skin tone, or a tag sequence (subdivision flags)."""
    if not points or not _pictographic(points[0]):
        return False
    rest = points[1:]
    if rest and rest[0] == _VS16:
        rest = rest[1:]
    if rest and rest[0] in _SKIN_TONES:
        rest = rest[1:]
    if rest and rest[-1] == _TAG_END and all(cp in _TAGS for cp in rest[:-1]):
        rest = []
    return not rest


def check_emoji(emoji: object) -> str:
    """One emoji: a single pictograph (with its presentation selector and skin tone), a flag
    (two regional indicators, or a tag sequence), a keycap, or a ZWJ sequence of those; at most
    ``MAX_EMOJI_CODE_POINTS`` code points. Text (letters, ``:thumbsup:``) is refused."""
    if not isinstance(emoji, str) or not emoji:
        raise InvalidFrame("'emoji' must be a non-empty string")
    points = [ord(c) for c in emoji]
    ok = len(points) <= MAX_EMOJI_CODE_POINTS and (
        (len(points) == 2 and all(cp in _REGIONAL for cp in points))
        or (chr(points[0]) in _KEYCAP_BASES and points[1:] in ([_VS16, _KEYCAP], [_KEYCAP]))
        or all(_element(part) for part in _split(points))
    )
    if not ok:
        raise InvalidEmoji(f"{emoji[:40]!r} is not one emoji")
    return emoji


def _split(points: list[int]) -> list[list[int]]:
    parts: list[list[int]] = [[]]
    for cp in points:
        if cp == _ZWJ:
            parts.append([])
        else:
            parts[-1].append(cp)
    return parts


def check_target(target_seq: object) -> int:
    return check_seq(target_seq, "target_seq")


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
    emoji: object = None,
    on: object = None,
    client_msg_id: object = None,
    max_chars: int,
) -> Stored:
    """Validate (``InvalidMessage``) and store an ``edit`` (with ``body``), a ``delete`` or a
    ``reaction`` (``emoji``, ``on``: set or cleared) of message ``target_seq``. The answer is
    the item, as a send's is the message (``Stored``; a repeat of ``client_msg_id`` is the
    original, ``duplicate``). Refusals raise ``NotFound`` (no such room or message, or a room
    the caller may not see; a reaction cleared that was never set), ``Forbidden`` (not the
    author; a delete: nor an owner or admin of the room), ``AlreadyDeleted`` or
    ``TooManyReactions``. A reaction that is already so stores nothing and is answered with
    the item that made it so (``duplicate``)."""
    target = check_target(target_seq)
    text = check_body(body, max_chars=max_chars) if kind == "edit" else None
    if kind == "reaction":
        emoji = check_emoji(emoji)
        if not isinstance(on, bool):
            raise InvalidFrame("'on' must be true or false")
    else:
        emoji = on = None
    cmid = check_client_msg_id(client_msg_id)
    channel = channel_for(room)
    sent = False
    try:
        async with reading(pool) as conn:
            sent = True
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
                emoji=emoji,
                on=on,
                client_msg_id=cmid,
                notify=publish is None,
            )
    except Unavailable as exc:
        if sent and not rolled_back(exc.__cause__):
            # Sent, and no answer (the connection dropped, the deadline passed): the commit
            # may have happened. A resend with the same client_msg_id gets the original.
            raise OutcomeUnknown(
                "the database did not confirm the change: it may have been stored; resend it "
                "with the same client_msg_id",
                cmid,
            ) from exc
        raise
    if outcome.error is not None:
        error, detail = _ERRORS[outcome.error]
        raise error(detail)
    assert outcome.seq is not None and outcome.id is not None  # noqa: S101 - stored
    assert outcome.created_at is not None  # noqa: S101
    record = MessageRecord(outcome.id, room, outcome.seq, author, text, cmid, outcome.created_at)
    if publish is not None and outcome.frame is not None:
        try:  # as a send's: the size limit's reference, and what is stored is what counts
            await publish(channel, encode_notification(outcome.seq, outcome.frame))
        except Exception:
            log.warning("publish failed for %s/%d; listeners will catch up", room, outcome.seq)
    return Stored(record, outcome.duplicate, outcome.frame)
