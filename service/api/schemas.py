"""Request and response bodies of the REST API (they appear in the OpenAPI docs)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.config import ROOM_NAME_MAX, ROOM_NAME_PATTERN

Role = Literal["owner", "admin", "member"]


class ItemHeader(BaseModel):
    """What every item of a room's stream has: the websocket ``message`` frame's header."""

    id: int
    room: str
    seq: int
    created_at: datetime
    author: str = Field(description="Who caused the item: the sender, or who changed a member")


class MessageOut(ItemHeader):
    """A stored message: the fields of the websocket ``message`` frame, without ``type``."""

    model_config = ConfigDict(from_attributes=True)

    kind: Literal["text"]
    body: str | None = Field(description="The current text; null once deleted")
    client_msg_id: str | None
    edited_at: datetime | None = Field(description="When it was last edited, if it was")
    deleted: bool = Field(description="Deleted: a tombstone, its text erased")
    reply_to: ReplyOut | None = Field(description="The message it answers, if any")


class EditEventOut(ItemHeader):
    """An edit of message ``target_seq`` (``?events=all``): its new text; null once the
    message is deleted (erased with it)."""

    kind: Literal["edit"]
    target_seq: int
    body: str | None
    client_msg_id: str | None


class DeleteEventOut(ItemHeader):
    """The delete of message ``target_seq`` (``?events=all``)."""

    kind: Literal["delete"]
    target_seq: int
    client_msg_id: str | None


class ReactionEventOut(ItemHeader):
    """A reaction to message ``target_seq`` set (``on``) or taken back (``?events=all``)."""

    kind: Literal["reaction"]
    target_seq: int
    emoji: str
    on: bool
    client_msg_id: str | None


class MemberEventOut(ItemHeader):
    """A membership change, an item of the room's stream (``?events=all``)."""

    kind: Literal["member"]
    user: str = Field(description="The member affected")
    action: Literal["joined", "left", "removed", "role"]
    role: Role | None = Field(description="The member's role after it; null once gone")


StreamItem = Annotated[
    MessageOut | MemberEventOut | EditEventOut | DeleteEventOut | ReactionEventOut,
    Field(discriminator="kind"),
]


class MessagePage(BaseModel):
    room: str
    last_seq: int = Field(description="The room's newest seq when the page was read")
    messages: list[StreamItem] = Field(
        description="Ascending by seq; text messages only unless ?events=all"
    )
    next_before: int | None = Field(description="Pass as ?before= for the older page, if any")
    next_after: int | None = Field(description="Pass as ?after= for the newer page, if any")


RoomName = Annotated[str, Field(pattern=ROOM_NAME_PATTERN, max_length=ROOM_NAME_MAX)]
UserId = Annotated[str, Field(min_length=1, max_length=128)]


class RoomOut(BaseModel):
    name: str
    kind: Literal["public", "private", "direct"]
    title: str | None
    role: Role | None = Field(description="The caller's role; null when not a member")
    last_seq: int
    created_at: datetime
    last_read_seq: int | None = Field(
        default=None, description="The caller's read cursor; null when not a member"
    )
    unread: int | None = Field(
        default=None,
        description="Text messages of others after the cursor that are not deleted (exact)",
    )
    mentions: int | None = Field(
        default=None, description="How many of the unread messages mention the caller (@user)"
    )


class RoomList(BaseModel):
    rooms: list[RoomOut] = Field(description="Public rooms and the caller's rooms, by name")
    next_after: str | None = Field(description="Pass as ?after= for the next page, if any")


class NewRoom(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: RoomName
    kind: Literal["public", "private"]
    title: Annotated[str, Field(max_length=200)] | None = None
    members: Annotated[list[UserId], Field(max_length=100)] = Field(
        default_factory=list, description="Added as members; the caller is the owner"
    )


class NewDirectRoom(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: UserId = Field(description="The other user")


class RoomChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Annotated[str, Field(max_length=200)] | None


class MemberOut(BaseModel):
    user: str
    role: Role
    joined_at: datetime
    last_read_seq: int = Field(description="How far the member has read")


class MemberList(BaseModel):
    members: list[MemberOut] = Field(description="By user id")
    next_after: str | None = Field(description="Pass as ?after= for the next page, if any")


class PresentUser(BaseModel):
    user: str
    name: str | None = Field(description="The display name of the user's token, if it had one")


class PresenceList(BaseModel):
    users: list[PresentUser] = Field(description="By user id")
    next_after: str | None = Field(description="Pass as ?after= for the next page, if any")


class MemberRole(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role = Field(description="`owner` hands ownership over (owners and service admins)")


class NewMessage(BaseModel):
    body: str = Field(description="The text; the author is always the token's subject")
    client_msg_id: str | None = Field(
        default=None, description="Your id for this message: a resend with it is not stored twice"
    )
    reply_to: int | None = Field(
        default=None, ge=1, description="The seq of the message (of this room) it answers"
    )


class ReplyOut(BaseModel):
    seq: int
    author: str
    quote: str | None = Field(description="The start of its current text; null once deleted")
    deleted: bool


class MessageEdit(BaseModel):
    body: str = Field(description="The new text (only the message's author edits it)")
    client_msg_id: str | None = Field(
        default=None, description="Your id for this edit: a resend with it is not stored twice"
    )


class ReadCursor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq: int = Field(
        ge=1,
        le=2**62,
        strict=True,
        description="Read up to here: the cursor moves forward, never back",
    )


class DevTokenRequest(BaseModel):
    user: str = Field(pattern=ROOM_NAME_PATTERN, max_length=ROOM_NAME_MAX)


class DevToken(BaseModel):
    token: str
    user: str
    expires_at: datetime


class Me(BaseModel):
    user: str = Field(description="The user id taken from the token: the author of messages")
    name: str | None = Field(description="The display name taken from the token, if any")


class ErrorOut(BaseModel):
    detail: str
    code: str | None = None


class SendFailedOut(ErrorOut):
    """A message that was not stored (``unavailable``, ``overloaded``) or may have been
    (``outcome_unknown``)."""

    client_msg_id: str | None = Field(
        default=None, description="Resend with this id (the server's when you gave none)"
    )


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorOut, "description": "The body could not be parsed"},
    401: {"model": ErrorOut, "description": "Missing, invalid or expired token"},
    404: {
        "model": ErrorOut,
        "description": "No such room, or a private room you are not a member of",
    },
    413: {"model": ErrorOut, "description": "Request body larger than CHAT_MAX_BODY_BYTES"},
    429: {"model": ErrorOut, "description": "Rate limited; see Retry-After"},
    503: {"model": ErrorOut, "description": "The database is unavailable; retry"},
}
"""Answers every authenticated route may give besides its own."""


class WebhookIn(BaseModel):
    """A room's own webhook receiver."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=1,
        max_length=2000,
        description="An absolute https:// (or http://) URL; every stream item of the room is "
        "POSTed to it, signed with CHAT_WEBHOOK_SECRET (docs/webhooks.md)",
    )


class WebhookOut(BaseModel):
    room: str
    url: str
    created_at: datetime


class DeadLetterOut(BaseModel):
    """A stream item given up on after ``CHAT_WEBHOOK_MAX_ATTEMPTS`` attempts."""

    hook: Literal["global", "room"] = Field(
        description="global: CHAT_WEBHOOK_URL; room: the room's own receiver"
    )
    room: str | None = Field(description="null once the room was deleted")
    seq: int
    attempts: int
    last_error: str | None
    enqueued_at: datetime
    dead_at: datetime


class DeadLetterList(BaseModel):
    dead_letters: list[DeadLetterOut]
    more: bool = Field(description="More dead letters than the limit")


class RetryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    room: Annotated[str | None, Field(pattern=ROOM_NAME_PATTERN, max_length=ROOM_NAME_MAX)] = Field(
        default=None, description="Only this room's dead letters; null: all"
    )


class RetryOut(BaseModel):
    retried: int
