"""Read state: per-member read cursors, exact unread counts, mentions

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

Unread counts come from numbers kept at write time (../shared/DESIGN.md, "Counters that stay
exact"), never from counting a room's messages at read time:

* ``room.text_count``: how many text messages the room has had; ``message.text_no``: a text
  message's place among them (1, 2, 3...; NULL for other kinds). Both are given out by
  ``chat_post_messages`` with the seqs, under the room row's lock.
* ``room_member.last_read_seq``: the member's read cursor (only ever moves forward), and
  ``read_text_no``: the ``text_no`` of the last text message at or before it.
* So a member's unread count is ``text_count - read_text_no`` minus the deleted text messages
  after the cursor (a partial index holds only deleted text messages: a count over the few
  there are). Posting moves the author's cursor past the message in the same transaction, so
  none of the author's own messages is ever after their cursor: the count is of other users'
  messages without looking at authors.
* ``message_mention``: who a text message mentions (``@user``), written with the message (only
  for a body that holds an ``@``), rewritten by its edit and removed by its delete: the mention
  count is a range count of the member's own rows after the cursor.

``chat_post_messages`` (same signature) also writes ``text_no``, mentions and the authors'
cursors; ``chat_post_event`` keeps mentions in step with edits and deletes; ``chat_mark_read``
moves cursors (``service.chat.reads``). A new member's cursor starts at the room's end.

Expand-only (new columns with defaults, a new table, functions replaced with the same
signatures): ``compatible_from`` is 0006. The backfill reads every message once.
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

compatible_from: str = "0006"

MENTIONS = r"""
CREATE FUNCTION chat_mentions(p_body text) RETURNS SETOF text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
SELECT DISTINCT m[1] FROM regexp_matches(
    p_body, '(?:^|[^A-Za-z0-9_.@-])@([A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9_])?)', 'g'
) AS m
LIMIT 20
$fn$
"""
"""The user ids a body mentions: ``@`` then an id of letters, digits, ``_``, ``.`` and ``-``
(not ending in ``.`` or ``-``, so "@bob." is bob), not inside a word or an e-mail address; at
most 20 distinct ones (``service.chat.reads.MAX_MENTIONS``): a body of a thousand ``@``s costs
twenty rows."""

POST_MESSAGES = """
CREATE OR REPLACE FUNCTION chat_post_messages(
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
    c record;
    v_room text;
    v_room_id bigint;   -- NULL: the room does not exist and none of the batch may create it
    v_kind text;
    v_refused boolean;
    v_reserved bigint;  -- room.last_seq once the batch's seqs of the room are reserved
    v_seq bigint;       -- the last of them given out so far
    v_text bigint;      -- the same for room.text_count and text_no
    v_head text;
    v_payload text;
    v_message message;  -- the row inserted
    v_reply_author text;  -- the message replied to: its author, the start of its text
    v_reply_quote text;
    v_reply_kind text;
    v_reply_deleted boolean;
    v_read_rooms text[];  -- each stored message: its room, author, seq and text_no
    v_read_room_ids bigint[];
    v_read_authors text[];
    v_read_seqs bigint[];
    v_read_text_nos bigint[];
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
                UPDATE room SET last_seq = v_seq, text_count = v_text WHERE room.id = v_room_id;
            END IF;
            UPDATE room SET last_seq = room.last_seq + m.in_room,
                text_count = room.text_count + m.in_room
                WHERE room.name = m.room
                RETURNING room.id, room.last_seq, room.kind, room.text_count
                INTO v_room_id, v_reserved, v_kind, v_text;
            IF NOT FOUND THEN
                IF m.may_create AND m.room NOT LIKE 'dm.%' THEN
                    INSERT INTO room (name, last_seq, text_count)
                    VALUES (m.room, m.in_room, m.in_room)
                    ON CONFLICT (name) DO UPDATE SET last_seq = room.last_seq + m.in_room,
                        text_count = room.text_count + m.in_room
                    RETURNING room.id, room.last_seq, room.kind, room.text_count
                    INTO v_room_id, v_reserved, v_kind, v_text;
                ELSE
                    v_room_id := NULL;
                    v_reserved := 0;
                    v_text := 0;
                END IF;
            END IF;
            v_room := m.room;
            v_seq := v_reserved - m.in_room;
            v_text := v_text - m.in_room;
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
            room_id, seq, author, body, client_msg_id, reply_to, reply_author, reply_quote,
            text_no
        )
        VALUES (v_room_id, o_seq, m.author, m.body, m.cmid, m.reply_to, v_reply_author,
            v_reply_quote, v_text + 1)
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
        v_text := v_text + 1;
        IF strpos(m.body, '@') > 0 THEN
            INSERT INTO message_mention (room_id, user_id, seq)
            SELECT v_room_id, u, o_seq FROM chat_mentions(m.body) AS u;
        END IF;
        v_read_rooms := v_read_rooms || m.room;
        v_read_room_ids := v_read_room_ids || v_room_id;
        v_read_authors := v_read_authors || m.author;
        v_read_seqs := v_read_seqs || o_seq;
        v_read_text_nos := v_read_text_nos || v_text;
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
        UPDATE room SET last_seq = v_seq, text_count = v_text WHERE room.id = v_room_id;
    END IF;

    -- Each author's read cursor past their last message of the batch (members only: others
    -- have none). In one order, room name then user, as chat_mark_read takes them: the two
    -- never wait on each other in a cycle.
    IF cardinality(v_read_authors) = 1 THEN
        UPDATE room_member SET last_read_seq = v_read_seqs[1], read_text_no = v_read_text_nos[1]
        WHERE room_id = v_read_room_ids[1] AND user_id = v_read_authors[1]
            AND last_read_seq < v_read_seqs[1];
    ELSIF cardinality(v_read_authors) > 1 THEN
        FOR c IN
            SELECT r.room_id, r.author, max(r.seq) AS seq, max(r.text_no) AS text_no
            FROM unnest(v_read_rooms, v_read_room_ids, v_read_authors, v_read_seqs,
                v_read_text_nos) AS r(room, room_id, author, seq, text_no)
            GROUP BY r.room, r.room_id, r.author
            ORDER BY r.room COLLATE "C", r.author COLLATE "C"
        LOOP
            UPDATE room_member SET last_read_seq = c.seq, read_text_no = c.text_no
            WHERE room_id = c.room_id AND user_id = c.author AND last_read_seq < c.seq;
        END LOOP;
    END IF;
END
$fn$
"""
"""0006's function, giving out ``text_no`` with the seqs, storing mentions, and moving the
authors' read cursors past their messages."""

POST_EVENT = """
CREATE OR REPLACE FUNCTION chat_post_event(
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
    ELSE
        -- The target's mentions go with its text: rewritten by an edit, gone with a delete.
        IF strpos(v_target.body, '@') > 0 THEN
            DELETE FROM message_mention
            WHERE room_id = v_room.id AND seq = p_target
                AND user_id IN (SELECT chat_mentions(v_target.body));
        END IF;
        IF p_kind = 'edit' THEN
            UPDATE message SET body = p_body, edited_at = v_event.created_at
            WHERE id = v_target.id;
            UPDATE message SET reply_quote = left(p_body, 100)
            WHERE room_id = v_room.id AND reply_to = p_target;
            IF strpos(p_body, '@') > 0 THEN
                INSERT INTO message_mention (room_id, user_id, seq)
                SELECT v_room.id, u, p_target FROM chat_mentions(p_body) AS u;
            END IF;
        ELSE
            -- Erased, not hidden: the message's text and every edit of it.
            UPDATE message SET body = NULL, deleted = true, reaction_count = 0
            WHERE id = v_target.id;
            UPDATE message SET body = NULL, deleted = true
            WHERE room_id = v_room.id AND target_seq = p_target AND kind = 'edit';
            DELETE FROM message_reaction WHERE room_id = v_room.id AND target_seq = p_target;
            UPDATE message SET reply_quote = NULL
            WHERE room_id = v_room.id AND reply_to = p_target;
        END IF;
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
"""0006's function; an edit rewrites its target's mentions, a delete removes them."""

MARK_READ = """
CREATE FUNCTION chat_mark_read(
    p_rooms text[],
    p_users text[],
    p_seqs bigint[],
    p_receipts_max integer
) RETURNS TABLE (o_room text, o_room_id bigint, o_user text, o_seq bigint, o_receipts boolean)
LANGUAGE plpgsql AS $fn$
DECLARE
    c record;
    v_text_no bigint;
BEGIN
    FOR c IN
        SELECT r.id AS room_id, r.name AS room, x.user_id,
            LEAST(max(x.seq), r.last_seq) AS seq
        FROM unnest(p_rooms, p_users, p_seqs) AS x(room, user_id, seq)
        JOIN room r ON r.name = x.room
        GROUP BY r.id, r.name, x.user_id
        ORDER BY r.name COLLATE "C", x.user_id COLLATE "C"
    LOOP
        SELECT msg.text_no INTO v_text_no FROM message msg
        WHERE msg.room_id = c.room_id AND msg.seq <= c.seq AND msg.text_no IS NOT NULL
        ORDER BY msg.seq DESC LIMIT 1;
        UPDATE room_member SET last_read_seq = c.seq, read_text_no = COALESCE(v_text_no, 0)
        WHERE room_id = c.room_id AND user_id = c.user_id AND last_read_seq < c.seq;
        IF FOUND THEN
            o_room := c.room;
            o_room_id := c.room_id;
            o_user := c.user_id;
            o_seq := c.seq;
            o_receipts := p_receipts_max > 0 AND (
                SELECT count(*) FROM (
                    SELECT 1 FROM room_member WHERE room_id = c.room_id LIMIT p_receipts_max + 1
                ) s
            ) <= p_receipts_max;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$fn$
"""
"""Move each member's cursor in each named room to the seq given (the highest of a user's in
one call; at most the room's ``last_seq``), never back: the rows it moved, with whether the
room is small enough for read receipts (at most ``p_receipts_max`` members). Rows are taken
in room name then user order, as ``chat_post_messages`` takes them."""


def _module(filename: str):  # type: ignore[no-untyped-def]
    path = Path(__file__).with_name(filename)
    spec = importlib.util.spec_from_file_location(f"chat_migration_{filename[:4]}", path)
    assert spec is not None and spec.loader is not None  # noqa: S101 - the file is beside this
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.add_column(
        "room", sa.Column("text_count", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.add_column("message", sa.Column("text_no", sa.BigInteger(), nullable=True))
    op.add_column(
        "room_member",
        sa.Column("last_read_seq", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.add_column(
        "room_member",
        sa.Column("read_text_no", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.create_table(
        "message_mention",
        sa.Column("room_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["room_id"],
            ["room.id"],
            name=op.f("fk_message_mention_room_id_room"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("room_id", "user_id", "seq", name=op.f("pk_message_mention")),
    )
    op.create_index(
        op.f("ix_message_deleted_text"),
        "message",
        ["room_id", "seq"],
        postgresql_where=sa.text("kind = 'text' AND deleted"),
    )
    # The counts for what is stored already; every member has read all of it.
    op.execute(
        """
        UPDATE message m SET text_no = n.text_no
        FROM (
            SELECT id, row_number() OVER (PARTITION BY room_id ORDER BY seq) AS text_no
            FROM message WHERE kind = 'text'
        ) n
        WHERE m.id = n.id
        """
    )
    op.execute(
        """
        UPDATE room r SET text_count = n.texts
        FROM (SELECT room_id, count(*) AS texts FROM message WHERE kind = 'text' GROUP BY room_id) n
        WHERE r.id = n.room_id
        """
    )
    op.execute(
        """
        UPDATE room_member rm SET last_read_seq = r.last_seq, read_text_no = r.text_count
        FROM room r WHERE r.id = rm.room_id
        """
    )
    op.execute(MENTIONS)
    op.execute(
        """
        INSERT INTO message_mention (room_id, user_id, seq)
        SELECT m.room_id, u, m.seq FROM message m, chat_mentions(m.body) AS u
        WHERE m.kind = 'text' AND strpos(m.body, '@') > 0
        """
    )
    op.execute(POST_MESSAGES)
    op.execute(POST_EVENT)
    op.execute(MARK_READ)


def downgrade() -> None:
    previous = _module("0006_edits_and_deletes.py")
    op.execute("DROP FUNCTION chat_mark_read(text[], text[], bigint[], integer)")
    op.execute(previous.POST_EVENT.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"))
    op.execute(previous.POST_MESSAGES.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"))
    op.execute("DROP FUNCTION chat_mentions(text)")
    op.drop_index(op.f("ix_message_deleted_text"), table_name="message")
    op.drop_table("message_mention")
    op.drop_column("room_member", "read_text_no")
    op.drop_column("room_member", "last_read_seq")
    op.drop_column("message", "text_no")
    op.drop_column("room", "text_count")
