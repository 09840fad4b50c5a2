"""chat_post_messages: store a batch of messages in one round trip (group commit)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

The service coalesces the sends that arrive while a commit is in flight into one call of this
function: one statement, one transaction, one fsync for the batch. Per message it allocates the
next seq under the room's row lock, inserts (a resend with the same client_msg_id returns the
original and gives the seq back) and queues the NOTIFY carrying the exact ``message`` frame, so
listeners hear of committed rows only, in seq order.

Rooms are locked in name order ("C" collation) whatever order the batch arrived in: two batches
never wait on each other in a cycle, so concurrent processes cannot deadlock. Within a room the
arrival order is kept.

The frame was built byte for byte as Python's ``envelope.message_frame`` built it (``to_json``
escapes strings exactly as ``json.dumps(ensure_ascii=False)``). Since migration 0004 the one
definition of the frame is the SQL function ``chat_message_json``.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POST_MESSAGES = """
CREATE FUNCTION chat_post_messages(
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
    v_room_id bigint;
    v_head text;
    v_payload text;
BEGIN
    FOR m IN
        SELECT u.ord::integer AS ord, u.room, u.channel, u.author, u.body, u.cmid
        FROM unnest(p_rooms, p_channels, p_authors, p_bodies, p_client_msg_ids)
            WITH ORDINALITY AS u(room, channel, author, body, cmid, ord)
        ORDER BY u.room COLLATE "C", u.ord
    LOOP
        o_ord := m.ord;
        UPDATE room SET last_seq = room.last_seq + 1 WHERE room.name = m.room
            RETURNING room.id, room.last_seq INTO v_room_id, o_seq;
        IF NOT FOUND THEN
            INSERT INTO room (name, last_seq) VALUES (m.room, 1)
            ON CONFLICT (name) DO UPDATE SET last_seq = room.last_seq + 1
            RETURNING room.id, room.last_seq INTO v_room_id, o_seq;
        END IF;

        INSERT INTO message (room_id, seq, author, body, client_msg_id)
        VALUES (v_room_id, o_seq, m.author, m.body, m.cmid)
        ON CONFLICT (room_id, author, client_msg_id) DO NOTHING
        RETURNING message.id, message.created_at INTO o_id, o_created_at;

        IF NOT FOUND THEN
            -- A resend. The room row is locked, so the original is committed and visible.
            UPDATE room SET last_seq = room.last_seq - 1 WHERE room.id = v_room_id;
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
END
$fn$
"""


def upgrade() -> None:
    op.execute(POST_MESSAGES)


def downgrade() -> None:
    op.execute("DROP FUNCTION chat_post_messages(text[], text[], text[], text[], text[], boolean)")
