"""Edits, deletes, reactions and replies: stream items that change a message's current state

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

* Two more kinds of stream item: ``edit`` (``target_seq``, ``body``: the new text) and
  ``delete`` (``target_seq``). Each takes the room's next seq, fans out, replays and resumes
  like a message.
* The state is kept beside the log, in the same transaction (../shared/DESIGN.md): an edit
  rewrites its target's ``body`` and sets ``edited_at`` (the edit's ``created_at``); a delete
  erases the target's body and the bodies of its edits (NULL: the text is gone from every row,
  not hidden) and sets ``deleted``. So history reads the current state from the message row,
  with no work at read time, and a resume replays text items in their current state followed
  by the events, which a client applies idempotently.
* ``chat_message_json`` gives a text item ``edited_at`` and ``deleted`` too (null/false until
  changed), an edit ``target_seq`` and ``body`` (null once its target is deleted), a delete
  ``target_seq``.
* ``chat_post_event`` stores one edit or delete: under the room row's lock it checks that the
  room exists and is the one the caller was let into, that the caller may post there, the
  ``client_msg_id`` (a repeat gets the original; one namespace per author per room across
  kinds, the message table's unique key), that the target is a text message that is not
  deleted, and who may: an edit its author only, a delete its author, the room's owner and
  admins, or a service admin. It answers with an error code instead of raising, so the caller
  maps each to its documented answer.

* Replies: ``chat_post_messages`` takes the seq each message replies to; a text item carries
  ``reply_to``: ``{"seq", "author", "quote", "deleted"}`` (the start of the replied message's
  current text, kept in the reply's row: an edit rewrites it, a delete erases it).

Expand-only for the code of 0005 (new columns with defaults, new functions, 0005's
``chat_post_messages`` kept as a wrapper of the new one, a replaced ``chat_message_json`` whose
text items gain fields a client ignores): ``compatible_from`` is 0005.
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
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
            ',"body":' || COALESCE(to_json(p_message.body)::text, 'null')
            || ',"client_msg_id":' || COALESCE(to_json(p_message.client_msg_id)::text, 'null')
            || ',"edited_at":' || COALESCE('"' || to_char(p_message.edited_at AT TIME ZONE 'UTC',
                'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"', 'null')
            || ',"deleted":' || CASE WHEN p_message.deleted THEN 'true' ELSE 'false' END
            || ',"reply_to":' || CASE WHEN p_message.reply_to IS NULL THEN 'null' ELSE
                '{"seq":' || p_message.reply_to
                || ',"author":' || to_json(p_message.reply_author)::text
                || ',"quote":' || COALESCE(to_json(p_message.reply_quote)::text, 'null')
                || ',"deleted":' || CASE WHEN p_message.reply_quote IS NULL
                    THEN 'true' ELSE 'false' END
                || '}' END
        WHEN 'member' THEN
            ',"user":' || to_json(p_message.member_user)::text
            || ',"action":"' || p_message.member_action
            || '","role":' || COALESCE(to_json(p_message.member_role)::text, 'null')
        WHEN 'edit' THEN
            ',"target_seq":' || p_message.target_seq
            || ',"body":' || COALESCE(to_json(p_message.body)::text, 'null')
            || ',"client_msg_id":' || COALESCE(to_json(p_message.client_msg_id)::text, 'null')
        WHEN 'reaction' THEN
            ',"target_seq":' || p_message.target_seq
            || ',"emoji":' || to_json(p_message.emoji)::text
            || ',"on":' || CASE WHEN p_message.reaction_on THEN 'true' ELSE 'false' END
            || ',"client_msg_id":' || COALESCE(to_json(p_message.client_msg_id)::text, 'null')
        ELSE
            ',"target_seq":' || p_message.target_seq
            || ',"client_msg_id":' || COALESCE(to_json(p_message.client_msg_id)::text, 'null')
        END
    || '}'
$fn$
"""

POST_EVENT = """
CREATE FUNCTION chat_post_event(
    p_room text,
    p_room_id bigint,
    p_channel text,
    p_author text,
    p_admin boolean,
    p_kind text,
    p_target bigint,
    p_body text,
    p_emoji text,
    p_on boolean,
    p_client_msg_id text,
    p_notify boolean
) RETURNS TABLE (
    o_seq bigint,
    o_id bigint,
    o_created_at timestamptz,
    o_frame text,
    o_duplicate boolean,
    o_error text
)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_room record;
    v_role text;
    v_target message;
    v_seq bigint;
    v_event message;
    v_set bigint;  -- a reaction: the seq of the item that set it (NULL: not set)
    v_head text;
    v_payload text;
BEGIN
    o_duplicate := false;
    SELECT id, kind INTO v_room FROM room WHERE name = p_room FOR UPDATE;
    IF NOT FOUND OR (p_room_id IS NOT NULL AND v_room.id <> p_room_id) THEN
        o_error := 'not_found';  -- no such room (any more)
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT role INTO v_role FROM room_member WHERE room_id = v_room.id AND user_id = p_author;
    IF v_room.kind <> 'public' AND v_role IS NULL AND NOT p_admin THEN
        o_error := 'not_found';  -- a room the caller may not see
        RETURN NEXT;
        RETURN;
    END IF;
    IF p_client_msg_id IS NOT NULL THEN
        SELECT * INTO v_event FROM message
        WHERE room_id = v_room.id AND author = p_author AND client_msg_id = p_client_msg_id;
        IF FOUND THEN  -- a repeat: the original's answer
            o_seq := v_event.seq;
            o_id := v_event.id;
            o_created_at := v_event.created_at;
            o_duplicate := true;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    SELECT * INTO v_target FROM message WHERE room_id = v_room.id AND seq = p_target;
    IF NOT FOUND OR v_target.kind <> 'text' THEN
        o_error := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;
    IF v_target.deleted THEN
        o_error := 'already_deleted';
        RETURN NEXT;
        RETURN;
    END IF;
    IF p_kind = 'reaction' THEN
        SELECT seq INTO v_set FROM message_reaction
        WHERE room_id = v_room.id AND target_seq = p_target AND emoji = p_emoji
            AND user_id = p_author;
        IF p_on AND v_set IS NOT NULL OR NOT p_on AND v_set IS NULL THEN
            -- Already so: nothing stored; the answer is the item that made it so.
            SELECT * INTO v_event FROM message
            WHERE room_id = v_room.id AND author = p_author AND kind = 'reaction'
                AND target_seq = p_target AND emoji = p_emoji
            ORDER BY seq DESC LIMIT 1;
            IF NOT FOUND THEN
                o_error := 'not_found';  -- removing a reaction never made
                RETURN NEXT;
                RETURN;
            END IF;
            o_seq := v_event.seq;
            o_id := v_event.id;
            o_created_at := v_event.created_at;
            o_duplicate := true;
            RETURN NEXT;
            RETURN;
        END IF;
        IF p_on AND NOT EXISTS (
            SELECT 1 FROM message_reaction
            WHERE room_id = v_room.id AND target_seq = p_target AND emoji = p_emoji
        ) AND (
            SELECT count(DISTINCT emoji) FROM message_reaction
            WHERE room_id = v_room.id AND target_seq = p_target
        ) >= 20 THEN  -- service.chat.events.MAX_DISTINCT_REACTIONS
            o_error := 'too_many_reactions';
            RETURN NEXT;
            RETURN;
        END IF;
    ELSIF v_target.author <> p_author AND (
        p_kind = 'edit' OR NOT (p_admin OR COALESCE(v_role IN ('owner', 'admin'), false))
    ) THEN
        o_error := 'forbidden';
        RETURN NEXT;
        RETURN;
    END IF;

    UPDATE room SET last_seq = last_seq + 1 WHERE id = v_room.id RETURNING last_seq INTO v_seq;
    INSERT INTO message (
        room_id, seq, author, body, client_msg_id, kind, target_seq, emoji, reaction_on
    )
    VALUES (v_room.id, v_seq, p_author, CASE WHEN p_kind = 'edit' THEN p_body END,
        p_client_msg_id, p_kind, p_target,
        CASE WHEN p_kind = 'reaction' THEN p_emoji END,
        CASE WHEN p_kind = 'reaction' THEN p_on END)
    RETURNING * INTO v_event;
    IF p_kind = 'reaction' THEN
        IF p_on THEN
            INSERT INTO message_reaction (room_id, target_seq, emoji, user_id, seq)
            VALUES (v_room.id, p_target, p_emoji, p_author, v_seq);
        ELSE
            DELETE FROM message_reaction
            WHERE room_id = v_room.id AND target_seq = p_target AND emoji = p_emoji
                AND user_id = p_author;
        END IF;
        -- How many there are, beside the log: history skips the lookup where there are none.
        UPDATE message SET reaction_count = reaction_count + CASE WHEN p_on THEN 1 ELSE -1 END
        WHERE id = v_target.id;
    ELSIF p_kind = 'edit' THEN
        UPDATE message SET body = p_body, edited_at = v_event.created_at
        WHERE id = v_target.id;
        UPDATE message SET reply_quote = left(p_body, 100)
        WHERE room_id = v_room.id AND reply_to = p_target;
    ELSE
        -- Erased, not hidden: the message's text and every edit of it.
        UPDATE message SET body = NULL, deleted = true, reaction_count = 0
        WHERE id = v_target.id;
        UPDATE message SET body = NULL, deleted = true
        WHERE room_id = v_room.id AND target_seq = p_target AND kind = 'edit';
        DELETE FROM message_reaction WHERE room_id = v_room.id AND target_seq = p_target;
        UPDATE message SET reply_quote = NULL WHERE room_id = v_room.id AND reply_to = p_target;
    END IF;

    o_seq := v_seq;
    o_id := v_event.id;
    o_created_at := v_event.created_at;
    o_frame := chat_message_json(p_room, v_event, true);
    IF p_notify THEN
        v_head := v_seq || ':' || extract(epoch FROM clock_timestamp()) || ':';
        v_payload := v_head || o_frame;
        IF octet_length(v_payload) > 7999 THEN  -- envelope.NOTIFY_PAYLOAD_LIMIT
            v_payload := v_head;  -- a reference: listeners read the row (as for a send)
        END IF;
        PERFORM pg_notify(p_channel, v_payload);
    END IF;
    RETURN NEXT;
END
$fn$
"""


POST_MESSAGES = """
CREATE FUNCTION chat_post_messages(
    p_rooms text[],
    p_channels text[],
    p_authors text[],
    p_bodies text[],
    p_client_msg_ids text[],
    p_room_ids bigint[],
    p_reply_tos bigint[],
    p_notify boolean
) RETURNS TABLE (
    o_ord integer,
    o_id bigint,
    o_seq bigint,
    o_body text,
    o_created_at timestamptz,
    o_duplicate boolean,
    o_frame text,
    o_error text
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
    v_reply_author text;  -- the message replied to: its author, the start of its text
    v_reply_quote text;
    v_reply_kind text;
    v_reply_deleted boolean;
BEGIN
    FOR m IN
        SELECT u.ord::integer AS ord, u.room, u.channel, u.author, u.body, u.cmid, u.room_id,
            u.reply_to,
            count(*) OVER (PARTITION BY u.room) AS in_room,
            bool_or(u.room_id IS NULL) OVER (PARTITION BY u.room) AS may_create
        FROM unnest(
            p_rooms, p_channels, p_authors, p_bodies, p_client_msg_ids, p_room_ids, p_reply_tos
        ) WITH ORDINALITY AS u(room, channel, author, body, cmid, room_id, reply_to, ord)
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
        o_error := CASE WHEN v_refused THEN 'forbidden' END;
        v_reply_author := NULL;
        v_reply_quote := NULL;
        IF o_error IS NULL AND m.reply_to IS NOT NULL THEN
            SELECT msg.author, left(msg.body, 100), msg.kind, msg.deleted
            INTO v_reply_author, v_reply_quote, v_reply_kind, v_reply_deleted
            FROM message msg WHERE msg.room_id = v_room_id AND msg.seq = m.reply_to;
            IF NOT FOUND OR v_reply_kind <> 'text' THEN
                o_error := 'not_found';
            ELSIF v_reply_deleted THEN
                o_error := 'already_deleted';
            END IF;
        END IF;
        IF o_error IS NOT NULL THEN
            -- Not allowed here, or no message to reply to: nothing stored, no seq taken.
            o_id := NULL; o_seq := NULL; o_body := NULL; o_created_at := NULL;
            o_duplicate := false; o_frame := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;
        o_seq := v_seq + 1;
        INSERT INTO message (
            room_id, seq, author, body, client_msg_id, reply_to, reply_author, reply_quote
        )
        VALUES (v_room_id, o_seq, m.author, m.body, m.cmid, m.reply_to, v_reply_author,
            v_reply_quote)
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
"""0005's function, and a reply: ``p_reply_tos`` names the message each replies to (NULL: none),
which must be a text message of the room that is not deleted (else ``o_error`` ``not_found`` or
``already_deleted``); the reply keeps its author and the start of its text (``reply_quote``,
100 characters), which an edit of it rewrites and its delete erases. ``o_error`` replaces
``o_refused`` (``forbidden``: 0005's refusal)."""

POST_MESSAGES_0005 = """
CREATE OR REPLACE FUNCTION chat_post_messages(
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
LANGUAGE sql AS $fn$
SELECT o_ord, o_id, o_seq, o_body, o_created_at, o_duplicate, o_frame, o_error IS NOT NULL
FROM chat_post_messages(
    p_rooms, p_channels, p_authors, p_bodies, p_client_msg_ids, p_room_ids, NULL, p_notify
)
$fn$
"""
"""0005's signature, for the release before while it still runs (this migration is expand-only):
the same store without replies. Its code reads ``o_refused``."""


def _module(filename: str):  # type: ignore[no-untyped-def]
    path = Path(__file__).with_name(filename)
    spec = importlib.util.spec_from_file_location(f"chat_migration_{filename[:4]}", path)
    assert spec is not None and spec.loader is not None  # noqa: S101 - the file is beside this
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.add_column("message", sa.Column("target_seq", sa.BigInteger(), nullable=True))
    op.add_column("message", sa.Column("edited_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "message", sa.Column("deleted", sa.Boolean(), server_default="false", nullable=False)
    )
    op.add_column("message", sa.Column("reply_to", sa.BigInteger(), nullable=True))
    op.add_column("message", sa.Column("reply_author", sa.Text(), nullable=True))
    op.add_column("message", sa.Column("reply_quote", sa.Text(), nullable=True))
    op.create_index(
        op.f("ix_message_room_id_reply_to"),
        "message",
        ["room_id", "reply_to"],
        postgresql_where=sa.text("reply_to IS NOT NULL"),
    )
    op.add_column(
        "message",
        sa.Column("reaction_count", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column("message", sa.Column("emoji", sa.Text(), nullable=True))
    op.add_column("message", sa.Column("reaction_on", sa.Boolean(), nullable=True))
    op.drop_constraint(op.f("ck_message_kind_known"), "message", type_="check")
    op.create_check_constraint(
        op.f("ck_message_kind_known"),
        "message",
        "kind IN ('text', 'member', 'edit', 'delete', 'reaction')",
    )
    op.create_check_constraint(
        op.f("ck_message_reaction_fields"),
        "message",
        "kind <> 'reaction' OR (emoji IS NOT NULL AND reaction_on IS NOT NULL)",
    )
    op.create_table(
        "message_reaction",
        sa.Column("room_id", sa.BigInteger(), nullable=False),
        sa.Column("target_seq", sa.BigInteger(), nullable=False),
        sa.Column("emoji", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["room_id"],
            ["room.id"],
            name=op.f("fk_message_reaction_room_id_room"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "room_id", "target_seq", "emoji", "user_id", name=op.f("pk_message_reaction")
        ),
    )
    op.drop_constraint(op.f("ck_message_kind_fields"), "message", type_="check")
    op.create_check_constraint(
        op.f("ck_message_kind_fields"), "message", "kind <> 'text' OR body IS NOT NULL OR deleted"
    )
    op.create_check_constraint(
        op.f("ck_message_target_fields"),
        "message",
        "kind NOT IN ('edit', 'delete') OR target_seq IS NOT NULL",
    )
    op.create_index(
        op.f("ix_message_room_id_target_seq"),
        "message",
        ["room_id", "target_seq"],
        postgresql_where=sa.text("target_seq IS NOT NULL"),
    )
    op.execute(MESSAGE_JSON)
    op.execute(POST_MESSAGES)
    op.execute(POST_MESSAGES_0005)
    op.execute(POST_EVENT)


def downgrade() -> None:
    previous = _module("0005_rooms_with_members.py")
    op.execute(
        "DROP FUNCTION chat_post_event(text, bigint, text, text, boolean, text, bigint, text, "
        "text, boolean, text, boolean)"
    )
    op.drop_table("message_reaction")
    op.execute(
        "DROP FUNCTION chat_post_messages(text[], text[], text[], text[], text[], bigint[], "
        "bigint[], boolean)"
    )
    op.execute(
        "DROP FUNCTION chat_post_messages(text[], text[], text[], text[], text[], bigint[], "
        "boolean)"
    )
    op.execute(previous.POST_MESSAGES)
    # Edits and deletes have no place in 0005's shape: they go (seqs keep their holes), and
    # deleted messages with them (their text is gone already).
    op.execute("DELETE FROM message WHERE kind IN ('edit', 'delete', 'reaction') OR deleted")
    op.drop_constraint(op.f("ck_message_reaction_fields"), "message", type_="check")
    op.drop_column("message", "reaction_on")
    op.drop_column("message", "emoji")
    op.drop_column("message", "reaction_count")
    op.drop_index(op.f("ix_message_room_id_reply_to"), table_name="message")
    op.drop_column("message", "reply_quote")
    op.drop_column("message", "reply_author")
    op.drop_column("message", "reply_to")
    op.drop_index(op.f("ix_message_room_id_target_seq"), table_name="message")
    op.drop_constraint(op.f("ck_message_target_fields"), "message", type_="check")
    op.drop_constraint(op.f("ck_message_kind_fields"), "message", type_="check")
    op.create_check_constraint(
        op.f("ck_message_kind_fields"), "message", "kind <> 'text' OR body IS NOT NULL"
    )
    op.drop_constraint(op.f("ck_message_kind_known"), "message", type_="check")
    op.create_check_constraint(
        op.f("ck_message_kind_known"), "message", "kind IN ('text', 'member')"
    )
    op.drop_column("message", "deleted")
    op.drop_column("message", "edited_at")
    op.drop_column("message", "target_seq")
    op.execute(previous.MESSAGE_JSON)
