"""The frames clients receive and the wire formats of fan-out, with the channel names they
travel on. It sits in ``chat/``, below the transports and the fan-out, because posting a
message (``chat.messages``) encodes what the fan-out (``service.realtime``) decodes and
delivers, and both transports (REST and websocket) write these frames.

A stream item's notification payload is ``"<seq>:<sent_at>:<frame>"`` where ``<frame>`` is the exact
``message`` frame clients receive, so a process forwards it without parsing or re-encoding the
JSON, and ``<sent_at>`` (epoch seconds, taken just before commit) measures fan-out latency. When
the frame would pass PostgreSQL's 8000-byte NOTIFY limit the payload is ``"<seq>:<sent_at>:"``
(a reference) and each listening process reads the message from the database once.

A signal (../shared/DESIGN.md: never stored, no seq) shares the room's channel:
``"!<to>\n<frame>"``, delivered as it is to the sockets of the room that ``<to>`` names: ``=user``
that user's, ``-user`` every one but that user's, empty every one. User ids are printable
(``service.auth``): none holds a newline. A signal for the processes rather than the sockets
starts with ``?`` and a letter: ``?p`` presence changes (``encode_presence``), ``?t`` / ``?s``
a user who started / stopped typing; each process turns them into coalesced frames.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any

from service.db.queries import MessageRecord, StoredMessage

ROOM_CLOSED = "closed"
"""The payload on a room's channel when its readers lose it all at once (the room deleted, or
a never-used name made a private or direct room): every socket of it closes (4403)."""
NOTIFY_PAYLOAD_LIMIT = 7999  # PostgreSQL refuses payloads of 8000 bytes or more
CHANNEL_PREFIX = "chat_room_"


class SharedFrame:
    """A ``message`` frame going to every local connection of its room: the text, and its
    bytes on the wire once the first connection has framed them (connections that negotiated
    no extension, such as compression, can all write the same bytes)."""

    __slots__ = ("text", "wire")

    def __init__(self, text: str) -> None:
        self.text = text
        self.wire: bytes | None = None


def channel_for(room: str) -> str:
    """A fixed-length, lower-case identifier: room names may be 64 bytes, channels only 63."""
    return CHANNEL_PREFIX + hashlib.blake2b(room.encode(), digest_size=16).hexdigest()


def iso(ts: datetime) -> str:
    """Always with microseconds, as ``chat_message_json`` (migration 0004) writes it.
    ``isoformat`` is twice as fast as ``strftime``; asyncpg's datetimes are in UTC already."""
    if ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    return ts.isoformat(timespec="microseconds")[:-6] + "Z"


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
"""Configuration only (no state between calls): ``json.dumps`` with arguments builds an
encoder per call."""


def dumps(obj: dict[str, Any]) -> str:
    return _ENCODER.encode(obj)


MESSAGE_FRAME_HEAD = '{"type":"message",'


def message_object(frame: str) -> str:
    """The message's JSON object (the 201 body of a REST post, a history item) from its
    ``message`` frame as ``chat_post_messages`` returns it: the inverse of ``stored_frame``."""
    return "{" + frame[len(MESSAGE_FRAME_HEAD) :]


def stored_frame(msg: StoredMessage) -> str:
    """The ``message`` frame of a message read from history, which comes as its JSON object:
    ``chat_message_json(..., true)`` of the same row, as the NOTIFY carries it."""
    return MESSAGE_FRAME_HEAD + msg.json[1:]


def dumps_with_items(obj: dict[str, Any], key: str, items: list[str]) -> str:
    """``dumps(obj)`` with one more key, a list of values that are JSON texts already."""
    head = dumps(obj)[:-1]
    return f'{head}{"," if len(head) > 1 else ""}"{key}":[{",".join(items)}]}}'


def ack_frame(msg: MessageRecord) -> str:
    """``dumps`` of the ack's fields, formatted directly: one per send."""
    cmid = "null" if msg.client_msg_id is None else _ENCODER.encode(msg.client_msg_id)
    return (
        f'{{"type":"ack","client_msg_id":{cmid},"seq":{msg.seq},"id":{msg.id},'
        f'"created_at":"{iso(msg.created_at)}"}}'
    )


def error_frame(code: str, detail: str, client_msg_id: str | None = None, **extra: Any) -> str:
    frame: dict[str, Any] = {"type": "error", "code": code, "detail": detail, **extra}
    if client_msg_id is not None:
        frame["client_msg_id"] = client_msg_id
    return dumps(frame)


def auth_ok_frame(exp: float | None) -> str:
    """The answer to an ``auth`` frame that renewed the socket: its new deadline (``exp``)."""
    return dumps({"type": "auth_ok", "exp": exp})


def ready_frame(room: str, last_seq: int, recovered: bool, presence: dict[str, Any]) -> str:
    return dumps(
        {
            "type": "ready",
            "room": room,
            "last_seq": last_seq,
            "recovered": recovered,
            "presence": presence,
        }
    )


def encode_notification(seq: int, frame: str) -> str:
    """The payload of stream item ``seq`` (any kind): the frame, or a reference when it would
    pass the NOTIFY limit. What the SQL functions NOTIFY, for a bus other than the database."""
    head = f"{seq}:{time.time():.6f}:"
    payload = head + frame
    if len(payload.encode()) > NOTIFY_PAYLOAD_LIMIT:
        return head
    return payload


SIGNAL_PREFIX = "!"
"""Starts a signal's payload; a stream item's starts with a digit, ``ROOM_CLOSED`` with "c"."""


def encode_signal(frame: str, *, to: str | None = None, but: str | None = None) -> str:
    """The payload of a signal for the sockets of user ``to`` in the room, or of every user
    ``but`` one, or (neither) of everyone."""
    head = f"={to}" if to is not None else f"-{but}" if but is not None else ""
    return f"{SIGNAL_PREFIX}{head}\n{frame}"


def decode_signal(payload: str) -> tuple[str | None, bool, str]:
    """``(user, only, frame)`` of a payload that starts with ``SIGNAL_PREFIX``: the frame goes
    to ``user``'s sockets only (``only``), or to every socket but theirs; ``user`` None: to
    every socket."""
    head, _, frame = payload.partition("\n")
    if len(head) < 2:
        return None, False, frame
    return head[2:], head[1] == "=", frame


def decode_notification(payload: str) -> tuple[int, float, str | None]:
    """``(seq, sent_at, frame)``; ``frame`` is None when it must be read from the database."""
    seq, sent_at, frame = payload.split(":", 2)
    return int(seq), float(sent_at), frame or None


PROCESS_SIGNAL = "?"
"""Starts a signal for the processes (``PRESENCE_SIGNAL``, ``TYPING_SIGNAL``, ``TYPING_STOP``)."""
PRESENCE_SIGNAL = "?p"
TYPING_SIGNAL = "?t"
TYPING_STOP = "?s"


def encode_presence(online: list[tuple[str, str | None]], offline: list[str]) -> list[str]:
    """Payloads of presence changes (``PRESENCE_SIGNAL``): ``{"on": [[user, name], ...],
    "off": [user, ...]}``, split so that each fits a NOTIFY."""
    items: list[tuple[str, object]] = [("on", [u, n]) for u, n in online]
    items += [("off", u) for u in offline]
    payloads: list[str] = []
    batch: dict[str, list[object]] = {"on": [], "off": []}
    size = 0
    for key, item in items:
        cost = len(dumps({"x": [item]}).encode())
        if size + cost > NOTIFY_PAYLOAD_LIMIT - 64 and size:
            payloads.append(PRESENCE_SIGNAL + dumps(batch))
            batch, size = {"on": [], "off": []}, 0
        batch[key].append(item)
        size += cost
    if size:
        payloads.append(PRESENCE_SIGNAL + dumps(batch))
    return payloads


def encode_typing(kind: str, users: list[str]) -> list[str]:
    """Payloads of a typing signal (``TYPING_SIGNAL`` or ``TYPING_STOP``): the user ids one
    per line (printable: no newline in one), split so that each fits a NOTIFY."""
    payloads: list[str] = []
    batch: list[str] = []
    size = 0
    for user in users:
        cost = len(user.encode()) + 1
        if batch and size + cost > NOTIFY_PAYLOAD_LIMIT - 8:
            payloads.append(kind + "\n".join(batch))
            batch, size = [], 0
        batch.append(user)
        size += cost
    if batch:
        payloads.append(kind + "\n".join(batch))
    return payloads


def presence_frame(room: str, online: list[str], offline: list[str]) -> str:
    return dumps({"type": "presence", "room": room, "online": online, "offline": offline})


def typing_frame(room: str, users: list[str]) -> str:
    return dumps({"type": "typing", "room": room, "users": users})
