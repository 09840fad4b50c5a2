"""Request and response bodies of the REST API (they appear in the OpenAPI docs)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from service.config import ROOM_NAME_MAX, ROOM_NAME_PATTERN


class MessageOut(BaseModel):
    """A stored message: the fields of the websocket ``message`` frame, without ``type``."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    room: str
    seq: int
    author: str
    body: str
    client_msg_id: str | None
    created_at: datetime


class MessagePage(BaseModel):
    room: str
    last_seq: int = Field(description="The room's newest seq when the page was read")
    messages: list[MessageOut] = Field(description="Ascending by seq")
    next_before: int | None = Field(description="Pass as ?before= for the older page, if any")
    next_after: int | None = Field(description="Pass as ?after= for the newer page, if any")


class RoomOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    last_seq: int
    created_at: datetime


class RoomList(BaseModel):
    rooms: list[RoomOut]
    next_after: str | None = Field(description="Pass as ?after= for the next page, if any")


class NewMessage(BaseModel):
    body: str = Field(description="The text; the author is always the token's subject")
    client_msg_id: str | None = Field(
        default=None, description="Your id for this message: a resend with it is not stored twice"
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
    413: {"model": ErrorOut, "description": "Request body larger than CHAT_MAX_BODY_BYTES"},
    429: {"model": ErrorOut, "description": "Rate limited; see Retry-After"},
    503: {"model": ErrorOut, "description": "The database is unavailable; retry"},
}
"""Answers every authenticated route may give besides its own."""
