"""chat_post_messages: one update of a room's last_seq per batch, not one per message

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

0002 bumped ``room.last_seq`` once per message. Every UPDATE leaves a row version behind, and
none of a batch's versions can be pruned before the batch commits (nor while another
process's batch holds an older snapshot), so under overload, when batches grow to hundreds of
messages, the five-row ``room`` table of the benchmark grew from 16 kB to 4 MB within seconds,
each UPDATE had more dead versions to step over, PostgreSQL's CPU per message went up and the
service fell further behind (docs/benchmarks.md, round 5).

Now the batch reaches each of its rooms with one UPDATE that locks the row and reserves a seq
for each of the room's messages in the batch; the messages take them in order, and only when
some were resends (which take no seq) is ``last_seq`` set back to the last one given out. One
new version per room per batch (two with resends), and for a batch of one message the same
two statements as 0002. Everything else is 0002's:
rooms in name order ("C" collation, so batches cannot deadlock), arrival order within a room,
a resend gives its seq back and returns the original, the NOTIFY carries the exact frame.
Same signature and results: servers of the release before call it unchanged.
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

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
        RETURNING message.id, message.created_at INTO o_id, o_created_at;

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
        o_body := NULL;  -- the caller has it
        o_duplicate := false;
        o_frame := '{"type":"message","room":' || to_json(m.room)::text
            || ',"seq":' || o_seq
            || ',"id":' || o_id
            || ',"author":' || to_json(m.author)::text
            || ',"body":' || to_json(m.body)::text
            || ',"client_msg_id":' || COALESCE(to_json(m.cmid)::text, 'null')
            || ',"created_at":"'
            || to_char(o_created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
            || '"}';
        IF p_notify THEN
            v_head := o_seq || ':' || extract(epoch FROM clock_timestamp()) || ':';
            v_payload := v_head || o_frame;
            IF octet_length(v_payload) > 7999 THEN  -- envelope.NOTIFY_PAYLOAD_LIMIT
                v_payload := v_head;  -- a reference: listeners read the row
            END IF;
            PERFORM pg_notify(m.channel, v_payload);
            o_frame := NULL;  -- already on its way
        END IF;
        RETURN NEXT;
    END LOOP;
    IF v_seq < v_reserved THEN
        UPDATE room SET last_seq = v_seq WHERE room.id = v_room_id;
    END IF;
END
$fn$
"""


def _previous() -> str:
    """0002's function, for the downgrade (migration files are not importable by name)."""
    path = Path(__file__).with_name("0002_post_messages_function.py")
    spec = importlib.util.spec_from_file_location("chat_migration_0002", path)
    assert spec is not None and spec.loader is not None  # noqa: S101 - the file is beside this
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.POST_MESSAGES.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def upgrade() -> None:
    op.execute(POST_MESSAGES)


def downgrade() -> None:
    op.execute(_previous())
