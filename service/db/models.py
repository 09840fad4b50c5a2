"""Tables. The schema itself is created only by the Alembic migrations in ``migrations/``;
a test fails when these models and the migrations disagree."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Room(Base):
    """A room; ``last_seq`` is the per-room counter, bumped under the row lock by each item of
    its stream (a message, a membership change)."""

    __tablename__ = "room"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    kind: Mapped[str] = mapped_column(Text, server_default="public")
    title: Mapped[str | None] = mapped_column(Text)
    text_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    """Text messages the room has had: the last one's ``text_no``."""
    last_deleted_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    """The highest seq of a deleted text message (0: none): unread counts skip looking."""

    __table_args__ = (
        CheckConstraint("last_seq >= 0", name="last_seq_non_negative"),
        CheckConstraint("kind IN ('public', 'private', 'direct')", name="kind_known"),
    )


class RoomMember(Base):
    """Who belongs to a room, and as what. Changed only together with a ``member`` item in the
    room's stream (``service.db.rooms``)."""

    __tablename__ = "room_member"

    room_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("room.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(Text, primary_key=True, index=True)
    role: Mapped[str] = mapped_column(Text)
    joined_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_read_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    """The read cursor: forward only (``chat_mark_read``, and past each message they post)."""
    read_text_no: Mapped[int] = mapped_column(BigInteger, server_default="0")
    """The ``text_no`` of the last text message at or before ``last_read_seq``."""
    last_mention_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    """The highest seq of a message that mentioned the member (0: none)."""

    __table_args__ = (CheckConstraint("role IN ('owner', 'admin', 'member')", name="role_known"),)


class Message(Base):
    """An item of a room's stream: ``seq`` is 1, 2, 3... per room with no gaps, in commit
    order. ``kind`` ``text`` is a message (``body``, its current text: an ``edit`` rewrites it,
    a ``delete`` erases it); ``member`` a membership change; ``edit`` and ``delete`` name their
    ``target_seq``."""

    __tablename__ = "message"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    room_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("room.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    author: Mapped[str] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text)
    client_msg_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    kind: Mapped[str] = mapped_column(Text, server_default="text")
    member_user: Mapped[str | None] = mapped_column(Text)
    member_action: Mapped[str | None] = mapped_column(Text)
    member_role: Mapped[str | None] = mapped_column(Text)
    target_seq: Mapped[int | None] = mapped_column(BigInteger)
    edited_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deleted: Mapped[bool] = mapped_column(Boolean, server_default="false")
    reply_to: Mapped[int | None] = mapped_column(BigInteger)
    reply_author: Mapped[str | None] = mapped_column(Text)
    reply_quote: Mapped[str | None] = mapped_column(Text)
    reaction_count: Mapped[int] = mapped_column(Integer, server_default="0")
    emoji: Mapped[str | None] = mapped_column(Text)
    reaction_on: Mapped[bool | None] = mapped_column(Boolean)
    text_no: Mapped[int | None] = mapped_column(BigInteger)
    """A text message's place among the room's text messages (1, 2, 3...): unread counts."""

    __table_args__ = (
        UniqueConstraint("room_id", "seq", name="uq_message_room_id_seq"),
        # NULL client_msg_ids never collide, so messages without one are never deduplicated.
        UniqueConstraint(
            "room_id", "author", "client_msg_id", name="uq_message_room_id_author_client_msg_id"
        ),
        CheckConstraint("seq > 0", name="seq_positive"),
        # One array constant each (migration 0007): PostgreSQL plans every CHECK per INSERT.
        CheckConstraint(
            "kind = ANY ('{text,member,edit,delete,reaction}'::text[])", name="kind_known"
        ),
        CheckConstraint(
            "kind <> 'reaction' OR (emoji IS NOT NULL AND reaction_on IS NOT NULL)",
            name="reaction_fields",
        ),
        CheckConstraint("kind <> 'text' OR body IS NOT NULL OR deleted", name="kind_fields"),
        CheckConstraint(
            "kind <> ALL ('{edit,delete}'::text[]) OR target_seq IS NOT NULL", name="target_fields"
        ),
        Index(
            "ix_message_room_id_reply_to",
            "room_id",
            "reply_to",
            postgresql_where=text("reply_to IS NOT NULL"),
        ),
        Index(
            "ix_message_room_id_target_seq",
            "room_id",
            "target_seq",
            postgresql_where=text("target_seq IS NOT NULL"),
        ),
        Index(
            "ix_message_deleted_text",
            "room_id",
            "seq",
            postgresql_where=text("kind = 'text' AND deleted"),
        ),
        CheckConstraint(
            "kind <> 'member' OR member_user IS NOT NULL"
            " AND member_action = ANY ('{joined,left,removed,role}'::text[])",
            name="member_fields",
        ),
    )


class MessageReaction(Base):
    """Who reacts to a message with what now: the current state beside the log, set and
    cleared with the ``reaction`` items (``seq``: the item that set it)."""

    __tablename__ = "message_reaction"

    room_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("room.id", ondelete="CASCADE"), primary_key=True
    )
    target_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    emoji: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)


class MessageMention(Base):
    """Who a text message mentions (``@user``) while it has that text: unread mention counts."""

    __tablename__ = "message_mention"

    room_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("room.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class PresenceReplica(Base):
    """A running process and when its presence expires (heartbeats move it forward).
    UNLOGGED (migration 0008): a crash of PostgreSQL empties it, and each process registers
    again."""

    __tablename__ = "presence_replica"
    __table_args__ = {"prefixes": ["UNLOGGED"]}

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Presence(Base):
    """A user present in a room, and the replicas holding (or, within the grace period, having
    just held) a socket of theirs. UNLOGGED, like ``presence_replica``."""

    __tablename__ = "presence"
    __table_args__ = {"prefixes": ["UNLOGGED"]}

    room: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str | None] = mapped_column(Text)
    replicas: Mapped[list[str]] = mapped_column(ARRAY(Text))


class Webhook(Base):
    """A room's own webhook receiver (migration 0009), besides the global ``CHAT_WEBHOOK_URL``."""

    __tablename__ = "webhook"

    room_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("room.id", ondelete="CASCADE"), primary_key=True
    )
    url: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WebhookCursor(Base):
    """How far a receiver (``hook``: ``global`` or ``room``) got in a room's stream (migration
    0011): the items to send are the room's ``message`` rows past ``delivered_seq``. ``pending``
    is set by a trigger on ``room`` when the room got items while the cursor was idle, and
    cleared by a deliverer that caught up (``service.db.webhooks``)."""

    __tablename__ = "webhook_cursor"

    hook: Mapped[str] = mapped_column(Text, primary_key=True)
    room_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("room.id", ondelete="CASCADE"), primary_key=True
    )
    delivered_seq: Mapped[int] = mapped_column(BigInteger)
    pending: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    """Failed attempts at the next item (``delivered_seq + 1``)."""
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    leased_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """While a replica sends the next item: nobody else may send one of the room until then."""
    lease_owner: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("hook IN ('global', 'room')", name="hook_known"),
        Index("ix_webhook_cursor_pending", "hook", "room_id", postgresql_where=text("pending")),
        {"postgresql_with": {"fillfactor": "70"}},
    )


class WebhookOutbox(Base):
    """A stream item queued to POST to a receiver on its own (``hook``: ``global`` or ``room``):
    a dead letter queued again, or an item queued by migration 0009's trigger before 0011 moved
    delivery to ``webhook_cursor``. Sent before its room's cursor goes on. A pointer, not a
    copy: the payload is the item's frame when it is sent."""

    __tablename__ = "webhook_outbox"

    hook: Mapped[str] = mapped_column(Text, primary_key=True)
    room_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    enqueued_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    dead_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Unused since 0010 (always NULL): kept for the queries of replicas of the release before."""
    leased_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """While a replica sends it: nobody else may until then (``service.db.webhooks``)."""
    lease_owner: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (CheckConstraint("hook IN ('global', 'room')", name="hook_known"),)


class WebhookDeadLetter(Base):
    """An item given up on after ``CHAT_WEBHOOK_MAX_ATTEMPTS`` (migration 0010): listed and
    queued again through the admin routes."""

    __tablename__ = "webhook_dead_letter"

    hook: Mapped[str] = mapped_column(Text, primary_key=True)
    room_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    dead_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (CheckConstraint("hook IN ('global', 'room')", name="hook_known"),)
