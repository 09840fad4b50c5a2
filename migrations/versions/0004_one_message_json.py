"""chat_message_json: the one definition of a message's JSON, for the NOTIFY path and history

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Before, a message's JSON was spelled out twice in SQL (``chat_post_messages``, and the history
reads of ``service.db.queries``) and once more in Python for tests. Now
``chat_message_json(room, message_row, as_frame)`` is the only definition:
``chat_post_messages`` builds the frame it NOTIFYs (or returns, for another bus) with it from
the row it inserted, and every history read calls it in its SELECT list. It is a STABLE
``LANGUAGE sql`` function, so the planner inlines it, reading the row's columns directly
(``EXPLAIN VERBOSE`` of a history read shows the expression): it costs what the spelled-out
expressions cost. ``as_frame`` true gives the websocket's ``message`` frame
(``"type":"message"`` first), false the object history pages list; the constant is folded away.

**Adding a field** to the message frame (docs/protocol.md) is one change: a new migration that
replaces ``chat_message_json`` (``CREATE OR REPLACE FUNCTION``, same arguments) with the field
added, and whose downgrade restores this body. It takes the whole ``message`` row, and
``chat_post_messages`` hands it the row as inserted (``RETURNING *``), so a new column is in
reach without changing a caller. A new kind of stream event (issue 15) is built the same way:
one function that its writer and the history reads share. Then the API models
(``service/api/schemas.py``) and docs/protocol.md follow:
tests/integration/test_message_frame.py fails until every path writes the same bytes and
exactly the documented fields.

``chat_post_messages`` keeps 0003's signature and result columns, so the release before calls
it unchanged: this migration is expand-only. One result changed: ``o_frame`` of a stored message
is returned also when it was NOTIFYed (before: NULL), so a REST post answers with the frame's
object instead of a Python copy of the definition; the release before reads ``o_frame`` only
when it did not NOTIFY, so it is unaffected. A resend's ``o_frame`` stays NULL.
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Expand-only: a new function, and chat_post_messages replaced with the same signature and
# results. The code of 0003 keeps working (docs/operations.md, "Upgrading").
compatible_from: str = "0003"

MESSAGE_JSON = """
CREATE OR REPLACE FUNCTION chat_message_json(p_room text, p_message message, p_as_frame boolean)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
SELECT '{' || CASE WHEN p_as_frame THEN '"type":"message",' ELSE '' END
    || '"room":' || to_json(p_room)::text
    || ',"seq":' || p_message.seq
    || ',"id":' || p_message.id
    || ',"author":' || to_json(p_message.author)::text
    || ',"body":' || to_json(p_message.body)::text
    || ',"client_msg_id":' || COALESCE(to_json(p_message.client_msg_id)::text, 'null')
    || ',"created_at":"'
    || to_char(p_message.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    || '"}'
$fn$
"""
"""STABLE, as ``to_char`` and ``to_json`` are (a stricter label would stop the inlining), and
not STRICT (a strict function is inlined only when its body is strict too). ``to_json``
escapes strings as Python's ``json.dumps(ensure_ascii=False)`` does, which the 201 body of
``POST /rooms/{room}/messages`` uses."""

POST_MESSAGES = """
CREATE OR REPLACE FUNCTION chat_post_messages(
    p_rooms text[],
    p_channels text[],
    p_authors text[],
    p_bodies text[],
    p_client_msg_ids text[],
    p_notify boolean
) RETURNS TABLE (
    o_ord integer,
    o_id bigint,
    o_seq bigint,
    o_body text,
    o_created_at timestamptz,
    o_duplicate boolean,
    o_frame text
)
LANGUAGE plpgsql AS $fn$
DECLARE
    m record;
    original record;
    v_room text;
    v_room_id bigint;
    v_reserved bigint;  -- room.last_seq once the batch's seqs of the room are reserved
    v_seq bigint;       -- the last of them given out so far
    v_head text;
    v_payload text;
    v_message message;  -- the row inserted
BEGIN
    FOR m IN
        SELECT u.ord::integer AS ord, u.room, u.channel, u.author, u.body, u.cmid,
            count(*) OVER (PARTITION BY u.room) AS in_room
        FROM unnest(p_rooms, p_channels, p_authors, p_bodies, p_client_msg_ids)
            WITH ORDINALITY AS u(room, channel, author, body, cmid, ord)
        ORDER BY u.room COLLATE "C", u.ord
    LOOP
        IF v_room IS DISTINCT FROM m.room THEN
            IF v_seq < v_reserved THEN  -- resends in the room before: give their seqs back
                UPDATE room SET last_seq = v_seq WHERE room.id = v_room_id;
            END IF;
            UPDATE room SET last_seq = room.last_seq + m.in_room WHERE room.name = m.room
                RETURNING room.id, room.last_seq INTO v_room_id, v_reserved;
            IF NOT FOUND THEN
                INSERT INTO room (name, last_seq) VALUES (m.room, m.in_room)
                ON CONFLICT (name) DO UPDATE SET last_seq = room.last_seq + m.in_room
                RETURNING room.id, room.last_seq INTO v_room_id, v_reserved;
            END IF;
            v_room := m.room;
            v_seq := v_reserved - m.in_room;
        END IF;

        o_ord := m.ord;
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
        -- The frame of the row as stored, whatever columns it has (inlined: a STABLE sql
        -- function in a simple expression).
        o_frame := chat_message_json(m.room, v_message, true);
        IF p_notify THEN
            v_head := o_seq || ':' || extract(epoch FROM clock_timestamp()) || ':';
            v_payload := v_head || o_frame;
            IF octet_length(v_payload) > 7999 THEN  -- envelope.NOTIFY_PAYLOAD_LIMIT
                v_payload := v_head;  -- a reference: listeners read the row
            END IF;
            PERFORM pg_notify(m.channel, v_payload);
        END IF;  -- and the frame comes back too: the 201 body of a REST post is made from it
        RETURN NEXT;
    END LOOP;
    IF v_seq < v_reserved THEN
        UPDATE room SET last_seq = v_seq WHERE room.id = v_room_id;
    END IF;
END
$fn$
"""
"""0003's function, but for where its frame comes from (``chat_message_json`` of the row
the INSERT returns); everything else as 0003's docstring has it."""


def _previous() -> str:
    """0003's function, for the downgrade (migration files are not importable by name)."""
    path = Path(__file__).with_name("0003_post_messages_one_room_update_per_batch.py")
    spec = importlib.util.spec_from_file_location("chat_migration_0003", path)
    assert spec is not None and spec.loader is not None  # noqa: S101 - the file is beside this
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.POST_MESSAGES)


def upgrade() -> None:
    op.execute(MESSAGE_JSON)
    op.execute(POST_MESSAGES)


def downgrade() -> None:
    op.execute(_previous())
    op.execute("DROP FUNCTION chat_message_json(text, message, boolean)")
