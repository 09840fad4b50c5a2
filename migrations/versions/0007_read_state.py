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
* ``room.last_deleted_seq`` (the highest seq of a deleted text message) and
  ``room_member.last_mention_seq`` (of a message that mentioned the member): marks kept at
  write time that let the room list skip either count where nothing can be after the cursor.

``chat_post_messages`` (same signature) also writes ``text_no``, mentions and the authors'
cursors; ``chat_post_event`` keeps mentions in step with edits and deletes; ``chat_mark_read``
moves cursors (``service.chat.reads``). A new member's cursor starts at the room's end.

And a send costs less (the saturate regression of 0006, measured with callgrind): the message
JSON in three parts so a send compiles only a text item's, and smaller CHECK expressions.

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

ITEM_HEAD = """
CREATE FUNCTION chat_item_head(p_room text, p_message message, p_as_frame boolean)
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
$fn$
"""
TEXT_JSON = """
CREATE FUNCTION chat_text_json(p_room text, p_message message, p_as_frame boolean)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
SELECT chat_item_head(p_room, p_message, p_as_frame)
    || ',"body":' || COALESCE(to_json(p_message.body)::text, 'null')
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
    || '}'
$fn$
"""
MESSAGE_JSON = """
CREATE OR REPLACE FUNCTION chat_message_json(p_room text, p_message message, p_as_frame boolean)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
SELECT CASE WHEN p_message.kind = 'text' THEN chat_text_json(p_room, p_message, p_as_frame)
    ELSE chat_item_head(p_room, p_message, p_as_frame)
    || CASE p_message.kind
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
    || '}' END
$fn$
"""
"""0006's ``chat_message_json``, the same bytes for every kind, in three parts: the header,
a text item's fields (``chat_text_json``), and the other kinds'. ``chat_post_messages`` stores
text only and calls ``chat_text_json``: a plpgsql expression is compiled once per transaction
with every branch of the inlined function, and a send's transaction is often one message, so
the other kinds' branches cost a send about 6% of its instructions (callgrind)."""

SMALLER_CHECKS = """
ALTER TABLE message
    DROP CONSTRAINT ck_message_kind_known,
    ADD CONSTRAINT ck_message_kind_known
        CHECK (kind = ANY ('{text,member,edit,delete,reaction}'::text[])),
    DROP CONSTRAINT ck_message_member_fields,
    ADD CONSTRAINT ck_message_member_fields
        CHECK (kind <> 'member' OR member_user IS NOT NULL
            AND member_action = ANY ('{joined,left,removed,role}'::text[])),
    DROP CONSTRAINT ck_message_target_fields,
    ADD CONSTRAINT ck_message_target_fields
        CHECK (kind <> ALL ('{edit,delete}'::text[]) OR target_seq IS NOT NULL)
"""
"""The same conditions with one array constant each instead of a list: PostgreSQL 15 reads
back and plans every CHECK of the table at each INSERT (``chat_post_messages`` runs one per
message), at a cost that follows the stored expression's size: ``kind IN`` five values is
stored as five constants rebuilt into an array each time. About 4% of a send's instructions."""

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
most 20 distinct ones (docs/protocol.md): a body of a thousand ``@``s costs
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
    v_read_room_ids bigint[];  -- each stored message: its room, author, seq and text_no
    v_read_authors text[];
    v_read_seqs bigint[];
    v_read_text_nos bigint[];
    r record;
    v_id bigint;
    v_names text[];  -- each room of the batch that exists (or was made)
    v_ids bigint[];
    v_kinds text[];
    v_counts bigint[];  -- the batch's messages for it (seqs reserved)
    v_seqs bigint[];    -- room.last_seq before the batch
    v_texts bigint[];   -- room.text_count before the batch
BEGIN
    IF cardinality(p_rooms) < 10 THEN
        -- A few messages: one statement each. The statement that stores a batch at once
        -- costs more to start than it saves below ten (callgrind, docs/benchmarks.md).
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
                    SELECT 1 FROM room_member rm
                    WHERE rm.room_id = v_room_id AND rm.user_id = m.author
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
                WITH mentioned AS (
                    INSERT INTO message_mention (room_id, user_id, seq)
                    SELECT v_room_id, u, o_seq FROM chat_mentions(m.body) AS u
                    RETURNING user_id
                )
                UPDATE room_member SET last_mention_seq = o_seq
                WHERE room_id = v_room_id AND user_id IN (SELECT user_id FROM mentioned);
            END IF;
            v_read_room_ids := v_read_room_ids || v_room_id;
            v_read_authors := v_read_authors || m.author;
            v_read_seqs := v_read_seqs || o_seq;
            v_read_text_nos := v_read_text_nos || v_text;
            o_id := v_message.id;
            o_created_at := v_message.created_at;
            o_body := NULL;  -- the caller has it
            o_duplicate := false;
            o_frame := chat_text_json(m.room, v_message, true);
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

        -- Each author's read cursor past their last message of the batch (members only).
        IF cardinality(v_read_authors) = 1 THEN
            UPDATE room_member SET last_read_seq = v_read_seqs[1], read_text_no = v_read_text_nos[1]
            WHERE room_id = v_read_room_ids[1] AND user_id = v_read_authors[1]
                AND last_read_seq < v_read_seqs[1];
        ELSIF cardinality(v_read_authors) > 1 THEN
            UPDATE room_member rm SET last_read_seq = c.seq, read_text_no = c.text_no
            FROM (
                SELECT x.room_id, x.author, max(x.seq) AS seq, max(x.text_no) AS text_no
                FROM unnest(v_read_room_ids, v_read_authors, v_read_seqs, v_read_text_nos)
                    AS x(room_id, author, seq, text_no)
                GROUP BY x.room_id, x.author
            ) c
            WHERE rm.room_id = c.room_id AND rm.user_id = c.author AND rm.last_read_seq < c.seq;
        END IF;
        RETURN;
    END IF;

    -- The rooms' rows, locked in name order (every writer of a room's stream takes them in
    -- this order), each with as many seqs reserved as the batch has messages for it. A room
    -- is made for a message that names no room id (a sender let in to a name never used).
    FOR r IN
        SELECT u.room, count(*) AS n, bool_or(u.room_id IS NULL) AS may_create
        FROM unnest(p_rooms, p_room_ids) AS u(room, room_id)
        GROUP BY u.room
        ORDER BY u.room COLLATE "C"
    LOOP
        UPDATE room SET last_seq = room.last_seq + r.n, text_count = room.text_count + r.n
            WHERE room.name = r.room
            RETURNING room.id, room.kind, room.last_seq, room.text_count
            INTO v_id, v_kind, v_seq, v_text;
        IF NOT FOUND THEN
            IF NOT r.may_create OR r.room LIKE 'dm.%' THEN
                CONTINUE;  -- its messages are refused
            END IF;
            INSERT INTO room (name, last_seq, text_count) VALUES (r.room, r.n, r.n)
            ON CONFLICT (name) DO UPDATE SET last_seq = room.last_seq + r.n,
                text_count = room.text_count + r.n
            RETURNING room.id, room.kind, room.last_seq, room.text_count
            INTO v_id, v_kind, v_seq, v_text;
        END IF;
        v_names := v_names || r.room;
        v_ids := v_ids || v_id;
        v_kinds := v_kinds || v_kind;
        v_counts := v_counts || r.n;
        v_seqs := v_seqs || (v_seq - r.n);
        v_texts := v_texts || (v_text - r.n);
    END LOOP;

    -- Then every message at once: one INSERT for the batch, whose constraints and indexes are
    -- set up once, not once per message.
    RETURN QUERY
    WITH input AS (
        SELECT u.ord::integer AS ord, u.room, u.channel, u.author, u.body, u.cmid, u.reply_to,
            u.room_id AS admitted_to, k.id AS room_id, k.kind, k.seq0, k.text0
        FROM unnest(
            p_rooms, p_channels, p_authors, p_bodies, p_client_msg_ids, p_room_ids, p_reply_tos
        ) WITH ORDINALITY AS u(room, channel, author, body, cmid, room_id, reply_to, ord)
        LEFT JOIN unnest(v_names, v_ids, v_kinds, v_seqs, v_texts)
            AS k(name, id, kind, seq0, text0) ON k.name = u.room
    ), checked AS (
        -- Refused: no room (or not the one the sender was let in to), not a member of a
        -- private or direct room, or no text message to reply to. Nothing stored, no seq.
        SELECT i.*,
            CASE
                WHEN i.room_id IS NULL OR i.admitted_to <> i.room_id THEN 'forbidden'
                WHEN i.kind <> 'public' AND NOT EXISTS (
                    SELECT 1 FROM room_member rm
                    WHERE rm.room_id = i.room_id AND rm.user_id = i.author
                ) THEN 'forbidden'
                WHEN i.reply_to IS NULL THEN NULL
                WHEN t.kind IS DISTINCT FROM 'text' THEN 'not_found'
                WHEN t.deleted THEN 'already_deleted'
            END AS error,
            t.author AS reply_author, left(t.body, 100) AS reply_quote,
            o.id AS original_id, o.seq AS original_seq, o.body AS original_body,
            o.created_at AS original_created_at
        FROM input i
        LEFT JOIN message t
            ON i.reply_to IS NOT NULL AND t.room_id = i.room_id AND t.seq = i.reply_to
        LEFT JOIN message o
            ON o.room_id = i.room_id AND o.author = i.author AND o.client_msg_id = i.cmid
    ), firsts AS (
        -- A resend within the batch is the first one's duplicate (a NULL id never is).
        SELECT c.*, row_number() OVER (
            PARTITION BY c.room_id, c.author, c.cmid, CASE WHEN c.cmid IS NULL THEN c.ord END
            ORDER BY c.ord
        ) AS copy
        FROM checked c
        WHERE c.error IS NULL AND c.original_id IS NULL
    ), fresh AS (
        SELECT f.*, f.seq0 + row_number() OVER (PARTITION BY f.room_id ORDER BY f.ord) AS seq
        FROM firsts f WHERE f.copy = 1
    ), stored AS (
        INSERT INTO message AS msg (
            room_id, seq, author, body, client_msg_id, reply_to, reply_author, reply_quote,
            text_no
        )
        SELECT f.room_id, f.seq, f.author, f.body, f.cmid, f.reply_to, f.reply_author,
            f.reply_quote, f.text0 + f.seq - f.seq0
        FROM fresh f
        RETURNING msg
    ), framed AS (
        SELECT f.ord, f.room_id, f.author, f.cmid, f.channel, (s.msg).seq, (s.msg).id,
            (s.msg).created_at, (s.msg).text_no, (s.msg).body,
            chat_text_json(f.room, s.msg, true) AS frame
        FROM stored s JOIN fresh f ON f.room_id = (s.msg).room_id AND f.seq = (s.msg).seq
    ), notified AS (
        -- In seq order per room: listeners deliver in the order of the notifications.
        SELECT count(pg_notify(x.channel, CASE WHEN octet_length(x.payload) > 7999
            THEN x.head ELSE x.payload END)) AS n  -- envelope.NOTIFY_PAYLOAD_LIMIT
        FROM (
            SELECT fr.channel, fr.seq || ':' || extract(epoch FROM clock_timestamp()) || ':'
                AS head, fr.seq || ':' || extract(epoch FROM clock_timestamp()) || ':'
                || fr.frame AS payload
            FROM framed fr WHERE p_notify
            ORDER BY fr.room_id, fr.seq
        ) x
    ), mentioned AS (
        INSERT INTO message_mention (room_id, user_id, seq)
        SELECT fr.room_id, u, fr.seq FROM framed fr, chat_mentions(fr.body) AS u
        WHERE strpos(fr.body, '@') > 0
    ), own_reads AS (
        -- Each author's read cursor past their last message of the batch (members only).
        UPDATE room_member rm SET last_read_seq = a.seq, read_text_no = a.text_no
        FROM (
            SELECT fr.room_id, fr.author, max(fr.seq) AS seq, max(fr.text_no) AS text_no
            FROM framed fr GROUP BY fr.room_id, fr.author
        ) a
        WHERE rm.room_id = a.room_id AND rm.user_id = a.author AND rm.last_read_seq < a.seq
    ), seqs_back AS (
        -- Seqs reserved for messages refused or resent go back: no holes.
        UPDATE room SET last_seq = k.seq0 + k.used, text_count = k.text0 + k.used
        FROM (
            SELECT k.id, k.seq0, k.text0, k.n, count(f.seq) AS used
            FROM unnest(v_ids, v_counts, v_seqs, v_texts) AS k(id, n, seq0, text0)
            LEFT JOIN fresh f ON f.room_id = k.id
            GROUP BY k.id, k.seq0, k.text0, k.n
        ) k
        WHERE room.id = k.id AND k.used < k.n
    )
    SELECT c.ord,
        COALESCE(fr.id, c.original_id, first.id),
        COALESCE(fr.seq, c.original_seq, first.seq),
        CASE WHEN fr.seq IS NULL THEN COALESCE(c.original_body, first.body) END,
        COALESCE(fr.created_at, c.original_created_at, first.created_at),
        c.error IS NULL AND fr.seq IS NULL,
        fr.frame,
        c.error
    FROM checked c
    LEFT JOIN framed fr ON fr.ord = c.ord
    LEFT JOIN framed first ON fr.ord IS NULL AND c.error IS NULL AND c.original_id IS NULL
        AND first.room_id = c.room_id AND first.author = c.author AND first.cmid = c.cmid
    CROSS JOIN notified
    ORDER BY c.ord;

    -- The mentioned members' marks (``last_mention_seq``), in a statement of their own: one
    -- statement may not update a member row twice (an author mentioned in the same batch).
    IF EXISTS (SELECT 1 FROM unnest(p_bodies) AS b WHERE strpos(b, '@') > 0) THEN
        UPDATE room_member rm SET last_mention_seq = x.seq
        FROM (
            SELECT mm.room_id, mm.user_id, max(mm.seq) AS seq
            FROM unnest(v_ids, v_seqs) AS k(id, seq0)
            JOIN message_mention mm ON mm.room_id = k.id AND mm.seq > k.seq0
            GROUP BY mm.room_id, mm.user_id
        ) x
        WHERE rm.room_id = x.room_id AND rm.user_id = x.user_id AND rm.last_mention_seq < x.seq;
    END IF;
END
$fn$
"""
"""0006's function with read state, set-based from a batch of ten messages: the rooms are
locked and their seqs reserved one room at a time (in name order), then one statement stores
the batch (one INSERT: PostgreSQL sets up the table's CHECK constraints, indexes and executor
once per batch instead of once per message), gives out ``text_no`` with the seqs, stores
mentions, moves the authors' read cursors past their messages, NOTIFYs the frames in seq
order and gives unused seqs back. The same answers, row for row, either way: refusals first,
then resends (of a stored message, or of one earlier in the batch). Sized for the writer's batches
(at most 256, ``MessageWriter.max_batch``): with generic plans its joins are planned for a few
rows, so a batch of tens of thousands (no caller sends one) would take seconds."""


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

    UPDATE room SET last_seq = last_seq + 1,
        last_deleted_seq = CASE WHEN p_kind = 'delete'
            THEN GREATEST(last_deleted_seq, p_target) ELSE last_deleted_seq END
        WHERE id = v_room.id RETURNING last_seq INTO v_seq;
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
                WITH mentioned AS (
                    INSERT INTO message_mention (room_id, user_id, seq)
                    SELECT v_room.id, u, p_target FROM chat_mentions(p_body) AS u
                    RETURNING user_id
                )
                UPDATE room_member
                SET last_mention_seq = GREATEST(last_mention_seq, p_target)
                WHERE room_id = v_room.id AND user_id IN (SELECT user_id FROM mentioned);
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
BEGIN
    -- The rooms' locks first, in the order chat_post_messages takes them: whoever writes
    -- room_member rows holds their room's lock, so no two writers wait on each other in a cycle.
    PERFORM 1 FROM room WHERE name = ANY (p_rooms) ORDER BY name COLLATE "C"
        FOR NO KEY UPDATE;
    RETURN QUERY
    WITH wanted AS (
        SELECT r.id AS room_id, r.name AS room, x.user_id, LEAST(max(x.seq), r.last_seq) AS seq
        FROM unnest(p_rooms, p_users, p_seqs) AS x(room, user_id, seq)
        JOIN room r ON r.name = x.room
        GROUP BY r.id, r.name, x.user_id
    ), moved AS (
        UPDATE room_member rm SET last_read_seq = w.seq, read_text_no = COALESCE((
            SELECT msg.text_no FROM message msg
            WHERE msg.room_id = w.room_id AND msg.seq <= w.seq AND msg.text_no IS NOT NULL
            ORDER BY msg.seq DESC LIMIT 1
        ), 0)
        FROM wanted w
        WHERE rm.room_id = w.room_id AND rm.user_id = w.user_id AND rm.last_read_seq < w.seq
        RETURNING rm.room_id, rm.user_id, rm.last_read_seq
    )
    SELECT w.room, m.room_id, m.user_id, m.last_read_seq,
        p_receipts_max > 0 AND (
            SELECT count(*) FROM (
                SELECT 1 FROM room_member s WHERE s.room_id = m.room_id LIMIT p_receipts_max + 1
            ) n
        ) <= p_receipts_max
    FROM moved m JOIN wanted w ON w.room_id = m.room_id AND w.user_id = m.user_id;
END
$fn$
"""
"""Move each member's cursor in each named room to the seq given (the highest of a user's in
one call; at most the room's ``last_seq``), never back: the rows it moved, with whether the
room is small enough for read receipts (at most ``p_receipts_max`` members). It holds the
rooms' locks meanwhile (a flush's worth of cursors: posts in those rooms wait that long)."""


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
    op.add_column(
        "room", sa.Column("last_deleted_seq", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.add_column(
        "room_member",
        sa.Column("last_mention_seq", sa.BigInteger(), server_default="0", nullable=False),
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
    op.execute(SMALLER_CHECKS)
    op.execute(ITEM_HEAD)
    op.execute(TEXT_JSON)
    op.execute(MESSAGE_JSON)
    op.execute(MENTIONS)
    op.execute(
        """
        INSERT INTO message_mention (room_id, user_id, seq)
        SELECT m.room_id, u, m.seq FROM message m, chat_mentions(m.body) AS u
        WHERE m.kind = 'text' AND strpos(m.body, '@') > 0
        """
    )
    op.execute(
        """
        UPDATE room r SET last_deleted_seq = d.seq
        FROM (SELECT room_id, max(seq) AS seq FROM message WHERE kind = 'text' AND deleted
            GROUP BY room_id) d
        WHERE r.id = d.room_id
        """
    )
    op.execute(
        """
        UPDATE room_member rm SET last_mention_seq = x.seq
        FROM (SELECT room_id, user_id, max(seq) AS seq FROM message_mention
            GROUP BY room_id, user_id) x
        WHERE rm.room_id = x.room_id AND rm.user_id = x.user_id
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
    op.execute(previous.MESSAGE_JSON)
    op.execute("DROP FUNCTION chat_text_json(text, message, boolean)")
    op.execute("DROP FUNCTION chat_item_head(text, message, boolean)")
    op.drop_constraint(op.f("ck_message_target_fields"), "message", type_="check")
    op.create_check_constraint(
        op.f("ck_message_target_fields"),
        "message",
        "kind NOT IN ('edit', 'delete') OR target_seq IS NOT NULL",
    )
    op.drop_constraint(op.f("ck_message_member_fields"), "message", type_="check")
    op.create_check_constraint(
        op.f("ck_message_member_fields"),
        "message",
        "kind <> 'member' OR (member_user IS NOT NULL"
        " AND member_action IN ('joined', 'left', 'removed', 'role'))",
    )
    op.drop_constraint(op.f("ck_message_kind_known"), "message", type_="check")
    op.create_check_constraint(
        op.f("ck_message_kind_known"),
        "message",
        "kind IN ('text', 'member', 'edit', 'delete', 'reaction')",
    )
    op.drop_index(op.f("ix_message_deleted_text"), table_name="message")
    op.drop_table("message_mention")
    op.drop_column("room_member", "last_mention_seq")
    op.drop_column("room", "last_deleted_seq")
    op.drop_column("room_member", "read_text_no")
    op.drop_column("room_member", "last_read_seq")
    op.drop_column("message", "text_no")
    op.drop_column("room", "text_count")
