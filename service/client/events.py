"""Typed events: one dataclass per frame type and per stream ``kind`` of docs/protocol.md.

Three families, so a caller can ``match`` on what it cares about and ignore the rest:

* **Stream items** (``Item`` and its subclasses): stored, numbered by the room's ``seq``,
  replayed after a drop. ``ChatClient`` hands each one to its caller exactly once, in seq order.
  A kind this client does not know arrives as ``UnknownItem`` (its fields in ``raw``): skip it,
  its seq still counts.
* **Signals** (``Presence``, ``Typing``, ``Read``, ``Receipt``): worthless late, never replayed.
* **Connection events** (``Ready``, ``Reset``, ``Disconnected``): what happened to the socket,
  so a view can show "reconnecting" and rebuild itself after a ``Reset``.

``parse`` turns one decoded frame into its event; answers (``Ack``, ``Error``, ``Pong``,
``AuthOk``) are consumed by the client itself and only raw-frame users see them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.client.errors import ProtocolError


@dataclass(frozen=True, slots=True)
class Item:
    """The header every stream item has; ``raw`` is the frame as it came."""

    room: str
    seq: int
    id: int
    created_at: str
    kind: str
    author: str
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """The message a text answers; ``author`` and ``quote`` are None in a send's own result,
    which is built from its ack (the ``TextMessage`` frame carries them)."""

    seq: int
    author: str | None = None
    quote: str | None = None
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Reaction:
    """One emoji's count on a message, as history and ``?history=N`` show them."""

    emoji: str
    count: int
    me: bool


@dataclass(frozen=True, slots=True)
class TextMessage(Item):
    body: str | None
    client_msg_id: str | None
    edited_at: str | None = None
    deleted: bool = False
    reply_to: ReplyTo | None = None
    reactions: tuple[Reaction, ...] = ()


@dataclass(frozen=True, slots=True)
class Edit(Item):
    """Apply it: message ``target_seq``'s text becomes ``body`` (None once it was deleted)."""

    target_seq: int
    body: str | None
    client_msg_id: str | None


@dataclass(frozen=True, slots=True)
class Delete(Item):
    """Apply it: message ``target_seq`` becomes a tombstone and loses its reactions."""

    target_seq: int
    client_msg_id: str | None


@dataclass(frozen=True, slots=True)
class ReactionChange(Item):
    """``author`` set (``on``) or took back ``emoji`` on message ``target_seq``."""

    target_seq: int
    emoji: str
    on: bool
    client_msg_id: str | None


@dataclass(frozen=True, slots=True)
class MemberChange(Item):
    """``user``'s membership changed (``joined``, ``left``, ``removed``, ``role``)."""

    user: str
    action: str
    role: str | None


@dataclass(frozen=True, slots=True)
class UnknownItem(Item):
    """A kind newer than this client: skip it (``raw`` has it all); its seq still counts."""


@dataclass(frozen=True, slots=True)
class Presence:
    """Apply ``online`` then ``offline`` to the set the last ``Ready`` gave."""

    room: str
    online: tuple[str, ...]
    offline: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Typing:
    """Everyone typing now but you; drop an entry not refreshed for 6 s."""

    room: str
    users: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Read:
    """Your own read cursor moved (on this or another device)."""

    room: str
    seq: int


@dataclass(frozen=True, slots=True)
class Receipt:
    """Another member's read cursor moved."""

    room: str
    user: str
    seq: int


@dataclass(frozen=True, slots=True)
class PresentUser:
    user: str
    name: str | None


@dataclass(frozen=True, slots=True)
class Ready:
    """A connection is up and caught up to ``last_seq``; ``present`` is who is here now
    (``present_count`` counts them all when the list was capped)."""

    room: str
    last_seq: int
    recovered: bool
    present: tuple[PresentUser, ...]
    present_count: int


@dataclass(frozen=True, slots=True)
class Reset:
    """The gap since the last seq seen was too large to replay: throw the view away and rebuild
    it (REST history) up to ``last_seq``; the items after it follow as usual. ``missed_from``
    is the first seq this client did not get."""

    room: str
    last_seq: int
    missed_from: int


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection dropped (close ``code``, 1006 when none came); the client reconnects in
    ``retry_in`` seconds and resumes where it was."""

    room: str
    code: int
    reason: str
    retry_in: float


@dataclass(frozen=True, slots=True)
class Ack:
    """A send, edit, delete or react was committed as item ``seq``."""

    client_msg_id: str
    seq: int
    id: int
    created_at: str


@dataclass(frozen=True, slots=True)
class Error:
    """An ``error`` frame; ``retry_after`` for ``rate_limited`` and ``overloaded``."""

    code: str
    detail: str
    client_msg_id: str | None
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class AuthOk:
    """The socket now closes at ``exp`` (Unix seconds) instead."""

    exp: float | None


Signal = Presence | Typing | Read | Receipt
Answer = Ack | Error | Pong | AuthOk
Event = Item | Signal | Ready | Reset | Disconnected
"""What iterating a room yields."""


def _reply_to(value: Any) -> ReplyTo | None:
    if not isinstance(value, dict):
        return None
    return ReplyTo(
        value["seq"], value.get("author"), value.get("quote"), bool(value.get("deleted"))
    )


def _item(frame: dict[str, Any]) -> Item:
    head = (
        frame["room"],
        int(frame["seq"]),
        int(frame["id"]),
        frame["created_at"],
        frame["kind"],
        frame["author"],
        frame,
    )
    kind = frame["kind"]
    if kind == "text":
        reactions = tuple(
            Reaction(r["emoji"], int(r["count"]), bool(r["me"])) for r in frame.get("reactions", ())
        )
        return TextMessage(
            *head,
            body=frame.get("body"),
            client_msg_id=frame.get("client_msg_id"),
            edited_at=frame.get("edited_at"),
            deleted=bool(frame.get("deleted")),
            reply_to=_reply_to(frame.get("reply_to")),
            reactions=reactions,
        )
    if kind == "edit":
        return Edit(*head, frame["target_seq"], frame.get("body"), frame.get("client_msg_id"))
    if kind == "delete":
        return Delete(*head, frame["target_seq"], frame.get("client_msg_id"))
    if kind == "reaction":
        return ReactionChange(
            *head,
            frame["target_seq"],
            frame["emoji"],
            bool(frame.get("on", True)),
            frame.get("client_msg_id"),
        )
    if kind == "member":
        return MemberChange(*head, frame["user"], frame["action"], frame.get("role"))
    return UnknownItem(*head)


def parse_item(frame: dict[str, Any]) -> Item:
    """A stream item from a ``message`` frame or a REST history entry."""
    try:
        return _item(frame)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"unreadable stream item {frame!r}") from exc


def parse(frame: dict[str, Any]) -> Event | Answer | None:
    """The event of one decoded frame; None for a frame type this client does not know
    (newer servers may add signals: skipping them is the protocol's rule for kinds too)."""
    try:
        kind = frame.get("type")
        if kind == "message":
            return _item(frame)
        if kind == "ack":
            return Ack(frame["client_msg_id"], frame["seq"], frame["id"], frame["created_at"])
        if kind == "error":
            retry = frame.get("retry_after")
            return Error(
                str(frame["code"]),
                str(frame.get("detail", "")),
                frame.get("client_msg_id"),
                None if retry is None else float(retry),
            )
        if kind == "pong":
            return Pong()
        if kind == "auth_ok":
            return AuthOk(frame.get("exp"))
        if kind == "presence":
            return Presence(frame["room"], tuple(frame["online"]), tuple(frame["offline"]))
        if kind == "typing":
            return Typing(frame["room"], tuple(frame["users"]))
        if kind == "read":
            return Read(frame["room"], int(frame["seq"]))
        if kind == "receipt":
            return Receipt(frame["room"], frame["user"], int(frame["seq"]))
        if kind == "ready":
            presence = frame.get("presence") or {}
            users = tuple(PresentUser(u["user"], u.get("name")) for u in presence.get("users", ()))
            return Ready(
                frame["room"],
                int(frame["last_seq"]),
                bool(frame.get("recovered")),
                users,
                int(presence.get("count", len(users))),
            )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"unreadable frame {frame!r}") from exc
    return None
