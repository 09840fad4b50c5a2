"""Request and response bodies of the REST API (they appear in the OpenAPI docs)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from service.config import ROOM_NAME_PATTERN
from service.db.queries import MessageRecord, RoomRecord


class MessageOut(BaseModel):
    id: int
    room: str
    seq: int
    author: str
    body: str
    client_msg_id: str | None
    created_at: datetime

    @classmethod
    def of(cls, record: MessageRecord) -> MessageOut:
        return cls(
            id=record.id,
            room=record.room,
            seq=record.seq,
            author=record.author,
            body=record.body,
            client_msg_id=record.client_msg_id,
            created_at=record.created_at,
        )


class MessagePage(BaseModel):
    room: str
    last_seq: int = Field(description="The room's newest seq when the page was read")
    messages: list[MessageOut] = Field(description="Ascending by seq")
    next_before: int | None = Field(description="Pass as ?before= for the older page, if any")
    next_after: int | None = Field(description="Pass as ?after= for the newer page, if any")


class RoomOut(BaseModel):
    name: str
    last_seq: int
    created_at: datetime

    @classmethod
    def of(cls, record: RoomRecord) -> RoomOut:
        return cls(name=record.name, last_seq=record.last_seq, created_at=record.created_at)


class RoomList(BaseModel):
    rooms: list[RoomOut]
    next_after: str | None = Field(description="Pass as ?after= for the next page, if any")


class NewMessage(BaseModel):
    body: str = Field(description="The text; the author is always the token's subject")
    client_msg_id: str | None = Field(
        default=None, description="Your id for this message: a resend with it is not stored twice"
    )


class DevTokenRequest(BaseModel):
    user: str = Field(pattern=ROOM_NAME_PATTERN)


class DevToken(BaseModel):
    token: str
    user: str
    expires_at: datetime
