"""Rooms with members: room kinds, room_member, membership items in the room's stream

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

* ``room.kind`` (``public`` | ``private`` | ``direct``) and ``room.title``. Rooms made by a
  first message stay ``public``, as before.
* ``room_member``: who belongs to a room and as what (``owner`` | ``admin`` | ``member``).
* The room's stream gets a second kind of item: ``message.kind`` is ``text`` (a message, as
  before) or ``member`` (a membership change: ``member_user`` affected, ``member_action``
  ``joined`` | ``left`` | ``removed`` | ``role``, ``member_role`` after it). Every item has
  the header ``room, seq, id, created_at, kind, author``; ``chat_message_json`` makes both
  kinds (one definition, as since 0004), so the NOTIFY path, history, replay and resume agree.
  ``body`` is NULL for a member item.
* ``chat_post_messages`` checks, in the statement that stores the message and under the room
  row's lock, that the author may post: in a private or direct room only members may, and a
  message for a room id the sender was admitted to (``p_room_ids``; NULL: any) is refused once
  that room is gone (deleted, or deleted and made anew), instead of creating a public room of
  that name. A refused send takes no seq and stores nothing (``o_refused``). A name under the
  reserved ``dm.`` prefix is never created by a message. No round trip is added: the check is
  one index probe in the call the writer makes anyway, and none in a public room.
* ``chat_append_member(room_id, author, user, action, role, channel, notify)`` takes the next
  seq of a room and stores a member item, NOTIFYing its frame like a message's; the caller
  (``service.db.rooms``) runs it in the transaction that changed ``room_member``, holding the
  room row's lock, so membership changes and messages are ordered by seq.

Not expand-only: the release before calls ``chat_post_messages`` with six arguments, which this
replaces (``compatible_from = "0005"``: stop the old release before migrating,
docs/operations.md "Upgrading").
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

compatible_from: str = "0005"

MESSAGE_JSON = """
CREATE OR REPLACE FUNCTION chat_message_json(p_room text, p_message message, p_as_frame boolean)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
SELECT '{' || CASE WHEN p_as_frame THEN '"type":"message",' ELSE '' END
    || '"room":' || to_json(p_room)::text
    || ',"seq":' || p_message.seq
    || ',"id":' || p_message.id
    || ',"created_at":"'
    || to_char(p_message.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    || '","kind":"' || p_message.kind
    || '","author":' || to_json(p_message.author)::text
    || CASE p_message.kind
        WHEN 'text' THEN
            ',"body":' || to_json(p_message.body)::text
            || ',"client_msg_id":' || COALESCE(to_json(p_message.client_msg_id)::text, 'null')
        ELSE
            ',"user":' || to_json(p_message.member_user)::text
            || ',"action":"' || p_message.member_action
            || '","role":' || COALESCE(to_json(p_message.member_role)::text, 'null')
        END
    || '}'
$fn$
"""
"""0004's function with the common header (``kind`` and ``author`` right after
``created_at``) and one branch per kind. Still inlined (a CASE is a simple expression)."""

POST_MESSAGES = """
CREATE FUNCTION chat_post_messages(
    p_rooms text[],
    p_channels text[],
    p_authors text[],
    p_bodies text[],
    p_client_msg_ids text[],
    p_room_ids bigint[],
    p_notify boolean
) RETURNS TABLE (
    o_ord integer,
    o_id bigint,
    o_seq bigint,
    o_body text,
    o_created_at timestamptz,
    o_duplicate boolean,
    o_frame text,
    o_refused boolean
)
LANGUAGE plpgsql AS $fn$
DECLARE
    m record;
    original record;
    v_room text;
    v_room_id bigint;   -- NULL: the room does not exist and none of the batch may create it
    v_kind text;
    v_refused boolean;
    v_reserved bigint;  -- room.last_seq once the batch's seqs of the room are reserved
    v_seq bigint;       -- the last of them given out so far
    v_head text;
    v_payload text;
    v_message message;  -- the row inserted
BEGIN
    FOR m IN
        SELECT u.ord::integer AS ord, u.room, u.channel, u.author, u.body, u.cmid, u.room_id,
            count(*) OVER (PARTITION BY u.room) AS in_room,
            bool_or(u.room_id IS NULL) OVER (PARTITION BY u.room) AS may_create
        FROM unnest(p_rooms, p_channels, p_authors, p_bodies, p_client_msg_ids, p_room_ids)
            WITH ORDINALITY AS u(room, channel, author, body, cmid, room_id, ord)
        ORDER BY u.room COLLATE "C", u.ord
    LOOP
        IF v_room IS DISTINCT FROM m.room THEN
            IF v_seq < v_reserved THEN  -- refused or resent in the room before: seqs back
                UPDATE room SET last_seq = v_seq WHERE room.id = v_room_id;
            END IF;
            UPDATE room SET last_seq = room.last_seq + m.in_room WHERE room.name = m.room
                RETURNING room.id, room.last_seq, room.kind INTO v_room_id, v_reserved, v_kind;
            IF NOT FOUND THEN
                IF m.may_create AND m.room NOT LIKE 'dm.%' THEN
                    INSERT INTO room (name, last_seq) VALUES (m.room, m.in_room)
                    ON CONFLICT (name) DO UPDATE SET last_seq = room.last_seq + m.in_room
                    RETURNING room.id, room.last_seq, room.kind
                    INTO v_room_id, v_reserved, v_kind;
                ELSE
                    v_room_id := NULL;
                    v_reserved := 0;
                END IF;
            END IF;
            v_room := m.room;
            v_seq := v_reserved - m.in_room;
        END IF;

        o_ord := m.ord;
        -- Simple expressions first (plpgsql evaluates them without the executor); the
        -- membership probe, a query, only in a private or direct room.
        v_refused := v_room_id IS NULL OR (m.room_id IS NOT NULL AND m.room_id <> v_room_id);
        IF NOT v_refused AND v_kind <> 'public' THEN
            v_refused := NOT EXISTS (
                SELECT 1 FROM room_member rm WHERE rm.room_id = v_room_id AND rm.user_id = m.author
            );
        END IF;
        IF v_refused THEN
            -- Not (or no longer) allowed here: nothing stored, no seq taken.
            o_id := NULL; o_seq := NULL; o_body := NULL; o_created_at := NULL;
            o_duplicate := false; o_frame := NULL; o_refused := true;
            RETURN NEXT;
            CONTINUE;
        END IF;
        o_refused := false;
        o_seq := v_seq + 1;
        INSERT INTO message (room_id, seq, author, body, client_msg_id)
        VALUES (v_room_id, o_seq, m.author, m.body, m.cmid)
        ON CONFLICT (room_id, author, client_msg_id) DO NOTHING
        RETURNING * INTO v_message;

        IF NOT FOUND THEN
            -- A resend: its seq is not taken. The room row is locked, so the original is
            -- committed and visible (or inserted earlier by this very batch).
            SELECT msg.id, msg.seq, msg.body, msg.created_at INTO original
            FROM message msg
            WHERE msg.room_id = v_room_id AND msg.author = m.author
                AND msg.client_msg_id = m.cmid;
            o_id := original.id;
            o_seq := original.seq;
            o_body := original.body;
            o_created_at := original.created_at;
            o_duplicate := true;
            o_frame := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;

        v_seq := o_seq;
        o_id := v_message.id;
        o_created_at := v_message.created_at;
        o_body := NULL;  -- the caller has it
        o_duplicate := false;
        o_frame := chat_message_json(m.room, v_message, true);
        IF p_notify THEN
            v_head := o_seq || ':' || extract(epoch FROM clock_timestamp()) || ':';
            v_payload := v_head || o_frame;
            IF octet_length(v_payload) > 7999 THEN  -- envelope.NOTIFY_PAYLOAD_LIMIT
                v_payload := v_head;  -- a reference: listeners read the row
            END IF;
            PERFORM pg_notify(m.channel, v_payload);
        END IF;
        RETURN NEXT;
    END LOOP;
    IF v_seq < v_reserved THEN
        UPDATE room SET last_seq = v_seq WHERE room.id = v_room_id;
    END IF;
END
$fn$
"""
"""0004's function with the authorization check. A batch's messages for one room name carry
the room ids their senders were admitted to; the room is created only for a message that
carries none (a sender admitted to a name never used), and a message whose id is not the
room's any more is refused."""

APPEND_MEMBER = """
CREATE FUNCTION chat_append_member(
    p_room_id bigint,
    p_author text,
    p_user text,
    p_action text,
    p_role text,
    p_channel text,
    p_notify boolean
) RETURNS TABLE (o_seq bigint, o_frame text)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_name text;
    v_seq bigint;
    v_message message;
    v_frame text;
BEGIN
    UPDATE room SET last_seq = last_seq + 1 WHERE id = p_room_id
        RETURNING name, last_seq INTO v_name, v_seq;
    INSERT INTO message (room_id, seq, author, body, kind, member_user, member_action, member_role)
    VALUES (p_room_id, v_seq, p_author, NULL, 'member', p_user, p_action, p_role)
    RETURNING * INTO v_message;
    v_frame := chat_message_json(v_name, v_message, true);
    IF p_notify THEN
        PERFORM pg_notify(
            p_channel,
            v_message.seq || ':' || extract(epoch FROM clock_timestamp()) || ':' || v_frame
        );
    END IF;
    o_seq := v_seq;
    o_frame := v_frame;
    RETURN NEXT;
END
$fn$
"""
"""A member item is a few hundred bytes at most (user ids are capped), so it is always
NOTIFYed whole."""


def _module(filename: str):  # type: ignore[no-untyped-def]
    path = Path(__file__).with_name(filename)
    spec = importlib.util.spec_from_file_location(f"chat_migration_{filename[:4]}", path)
    assert spec is not None and spec.loader is not None  # noqa: S101 - the file is beside this
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.add_column("room", sa.Column("kind", sa.Text(), server_default="public", nullable=False))
    op.add_column("room", sa.Column("title", sa.Text(), nullable=True))
    op.create_check_constraint(
        op.f("ck_room_kind_known"), "room", "kind IN ('public', 'private', 'direct')"
    )
    op.create_table(
        "room_member",
        sa.Column("room_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column(
            "joined_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "role IN ('owner', 'admin', 'member')", name=op.f("ck_room_member_role_known")
        ),
        sa.ForeignKeyConstraint(
            ["room_id"], ["room.id"], name=op.f("fk_room_member_room_id_room"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("room_id", "user_id", name=op.f("pk_room_member")),
    )
    op.create_index(op.f("ix_room_member_user_id"), "room_member", ["user_id"])
    op.add_column("message", sa.Column("kind", sa.Text(), server_default="text", nullable=False))
    op.add_column("message", sa.Column("member_user", sa.Text(), nullable=True))
    op.add_column("message", sa.Column("member_action", sa.Text(), nullable=True))
    op.add_column("message", sa.Column("member_role", sa.Text(), nullable=True))
    op.alter_column("message", "body", nullable=True)
    op.create_check_constraint(
        op.f("ck_message_kind_known"), "message", "kind IN ('text', 'member')"
    )
    op.create_check_constraint(
        op.f("ck_message_kind_fields"),
        "message",
        "kind <> 'text' OR body IS NOT NULL",
    )
    op.create_check_constraint(
        op.f("ck_message_member_fields"),
        "message",
        "kind <> 'member' OR (member_user IS NOT NULL"
        " AND member_action IN ('joined', 'left', 'removed', 'role'))",
    )
    op.execute(MESSAGE_JSON)
    op.execute("DROP FUNCTION chat_post_messages(text[], text[], text[], text[], text[], boolean)")
    op.execute(POST_MESSAGES)
    op.execute(APPEND_MEMBER)


def downgrade() -> None:
    previous = _module("0004_one_message_json.py")
    op.execute("DROP FUNCTION chat_append_member(bigint, text, text, text, text, text, boolean)")
    op.execute(
        "DROP FUNCTION chat_post_messages(text[], text[], text[], text[], text[], bigint[], "
        "boolean)"
    )
    # Member items cannot be told in the old shape: they go, and the rooms' seqs keep their
    # holes (a resume reads past them). Non-public rooms become public again.
    op.execute("DELETE FROM message WHERE kind <> 'text'")
    op.drop_constraint(op.f("ck_message_member_fields"), "message", type_="check")
    op.drop_constraint(op.f("ck_message_kind_fields"), "message", type_="check")
    op.drop_constraint(op.f("ck_message_kind_known"), "message", type_="check")
    op.alter_column("message", "body", nullable=False)
    op.drop_column("message", "member_role")
    op.drop_column("message", "member_action")
    op.drop_column("message", "member_user")
    op.drop_column("message", "kind")
    op.execute(previous.MESSAGE_JSON)
    op.execute(previous.POST_MESSAGES)
    op.drop_index(op.f("ix_room_member_user_id"), table_name="room_member")
    op.drop_table("room_member")
    op.drop_constraint(op.f("ck_room_kind_known"), "room", type_="check")
    op.drop_column("room", "title")
    op.drop_column("room", "kind")
