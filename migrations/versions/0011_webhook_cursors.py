"""Webhook cursors: a room's delivery position per receiver instead of an outbox row per item

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03

The outbox of migrations 0009 and 0010 wrote a row per stream item and receiver in the
transaction that stored the item, and deleted it once delivered. That write, and the
statement-level trigger's queries on its transition table (which PostgreSQL plans anew on every
call), cost the writer's commits about 50 µs each: with a slow receiver the fanout's p99 grew by
a tenth (docs/benchmarks.md, round 12). The ``message`` table is already an ordered, durable log
per room, so what delivery needs is a position in it:

* ``webhook_cursor``: per receiver (``hook``: ``global`` for ``CHAT_WEBHOOK_URL``, ``room`` for
  the room's registration) and room, the last seq delivered (or given up on), whether the room
  may have items past it (``pending``), the attempts and backoff of its next item and the lease
  of the deliverer sending it. The items are the ``message`` rows past ``delivered_seq``.
* ``chat_webhook_mark``: a row trigger on ``room`` when ``last_seq`` grows (each room's seqs are
  taken by one update per batch, under the row lock, by every function that stores an item). It
  sets ``pending`` on the room's cursors that are idle, NOTIFYing ``chat_webhook`` then, and
  makes the room's ``global`` cursor, starting at this item, for a connection with
  ``chat.webhook = 'on'``. A busy room's cursor is pending already: the trigger then only reads
  two index entries, with plans cached across calls (no transition table). A ``room`` cursor is
  made with its registration (``service.db.webhooks``), and here for those that exist.
* A deliverer marks a caught-up cursor idle only under a share lock on the room row, which a
  writer of the room holds until its commit: an item being stored meanwhile is seen, or its
  trigger sees the cursor idle and marks it again. Nothing is skipped.

``webhook_outbox`` stays for what is queued one item at a time: dead letters queued again and
the items 0010 queued before this migration, both sent before their room's cursor goes on.
The migration holds ``room`` in share mode, so no item is stored while it switches the trigger
over: what was queued before is in the outbox, what comes after is past the cursors.

Expand-only for 0010's code: its queries on ``webhook_outbox``, ``webhook_dead_letter`` and
``webhook`` still work (its deliverers send what is in the outbox; a room registered through one
of its replicas gets its cursor from the next deliverer of this release that looks).
``compatible_from`` is 0010.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

compatible_from: str = "0010"

MARK = """
CREATE FUNCTION chat_webhook_mark() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    v_from bigint := CASE WHEN TG_OP = 'INSERT' THEN 0 ELSE OLD.last_seq END;
    v_marked bigint := 0;
BEGIN
    IF COALESCE(current_setting('chat.webhook', true), '') = 'on' THEN
        UPDATE webhook_cursor SET pending = true, next_attempt_at = now()
         WHERE hook IN ('global', 'room') AND room_id = NEW.id AND NOT pending;
        GET DIAGNOSTICS v_marked = ROW_COUNT;
        IF NOT EXISTS (SELECT FROM webhook_cursor WHERE hook = 'global' AND room_id = NEW.id) THEN
            INSERT INTO webhook_cursor (hook, room_id, delivered_seq)
            VALUES ('global', NEW.id, v_from) ON CONFLICT DO NOTHING;
            v_marked := v_marked + 1;
        END IF;
    ELSIF EXISTS (SELECT FROM webhook) THEN
        UPDATE webhook_cursor SET pending = true, next_attempt_at = now()
         WHERE hook = 'room' AND room_id = NEW.id AND NOT pending;
        GET DIAGNOSTICS v_marked = ROW_COUNT;
    END IF;
    IF v_marked > 0 THEN
        PERFORM pg_notify('chat_webhook', '');
    END IF;
    RETURN NULL;
END
$fn$
"""

# Migration 0010's function, word for word, for the downgrade: a migration stands on its own file.
ENQUEUE_0010 = """
CREATE FUNCTION chat_webhook_enqueue() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    v_global boolean := COALESCE(current_setting('chat.webhook', true), '') = 'on';
    v_rooms boolean := EXISTS (SELECT FROM webhook);
    v_wake boolean;
BEGIN
    IF NOT (v_global OR v_rooms) THEN
        RETURN NULL;
    END IF;
    -- The outer query's snapshot leaves out the CTE's own rows. Wake the deliverers when a
    -- room's queue for a receiver held nothing that is not being sent right now.
    WITH queued AS (
        INSERT INTO webhook_outbox (hook, room_id, seq)
        SELECT 'global', n.room_id, n.seq FROM chat_new_item n WHERE v_global
        UNION ALL
        SELECT 'room', n.room_id, n.seq FROM chat_new_item n
          JOIN webhook w ON w.room_id = n.room_id WHERE v_rooms
        RETURNING hook, room_id
    )
    SELECT bool_or(NOT EXISTS (
               SELECT FROM webhook_outbox o
                WHERE o.hook = q.hook AND o.room_id = q.room_id
                  AND (o.leased_until IS NULL OR o.leased_until <= now())))
      INTO v_wake
      FROM (SELECT DISTINCT hook, room_id FROM queued) q;
    IF v_wake THEN
        PERFORM pg_notify('chat_webhook', '');
    END IF;
    RETURN NULL;
END
$fn$
"""


def upgrade() -> None:
    # No item is stored while the trigger is switched over (writers wait for this transaction).
    op.execute("LOCK TABLE room IN SHARE MODE")
    op.execute(
        """
        CREATE TABLE webhook_cursor (
            hook text NOT NULL,
            room_id bigint NOT NULL,
            delivered_seq bigint NOT NULL,
            pending boolean NOT NULL DEFAULT true,
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            last_error text,
            leased_until timestamptz,
            lease_owner text,
            CONSTRAINT pk_webhook_cursor PRIMARY KEY (hook, room_id),
            CONSTRAINT fk_webhook_cursor_room_id_room FOREIGN KEY (room_id)
                REFERENCES room (id) ON DELETE CASCADE,
            CONSTRAINT ck_webhook_cursor_hook_known CHECK (hook IN ('global', 'room'))
        ) WITH (fillfactor = 70)
        """
    )
    # The deliverers' one question: which cursors may have items. Settling an item changes
    # no indexed column, so it is a HOT update (room left on the page by the fillfactor).
    op.execute(
        "CREATE INDEX ix_webhook_cursor_pending ON webhook_cursor (hook, room_id) WHERE pending"
    )
    # Cursors start past what is stored: the outbox holds what is queued of it.
    op.execute(
        """
        INSERT INTO webhook_cursor (hook, room_id, delivered_seq, pending)
        SELECT 'room', r.id, r.last_seq, false FROM webhook w JOIN room r ON r.id = w.room_id
        UNION ALL
        SELECT 'global', r.id, r.last_seq, false FROM room r
         WHERE EXISTS (SELECT FROM webhook_outbox o WHERE o.hook = 'global' AND o.room_id = r.id)
        """
    )
    op.execute("DROP TRIGGER trg_message_webhook ON message")
    op.execute("DROP FUNCTION chat_webhook_enqueue()")
    op.execute(MARK)
    op.execute(
        """
        CREATE TRIGGER trg_room_webhook_grew AFTER UPDATE OF last_seq ON room
        FOR EACH ROW WHEN (NEW.last_seq > OLD.last_seq) EXECUTE FUNCTION chat_webhook_mark()
        """
    )
    op.execute(
        """
        CREATE TRIGGER trg_room_webhook_made AFTER INSERT ON room
        FOR EACH ROW WHEN (NEW.last_seq > 0) EXECUTE FUNCTION chat_webhook_mark()
        """
    )


def downgrade() -> None:
    op.execute("LOCK TABLE room IN SHARE MODE")
    op.execute("DROP TRIGGER trg_room_webhook_made ON room")
    op.execute("DROP TRIGGER trg_room_webhook_grew ON room")
    op.execute("DROP FUNCTION chat_webhook_mark()")
    op.execute(ENQUEUE_0010)
    op.execute(
        """
        CREATE TRIGGER trg_message_webhook AFTER INSERT ON message
        REFERENCING NEW TABLE AS chat_new_item
        FOR EACH STATEMENT EXECUTE FUNCTION chat_webhook_enqueue()
        """
    )
    # What the cursors had still to send goes into the outbox, one row per item.
    op.execute(
        """
        INSERT INTO webhook_outbox (hook, room_id, seq, attempts, last_error, enqueued_at)
        SELECT c.hook, c.room_id, m.seq, CASE WHEN m.seq = c.delivered_seq + 1
               THEN c.attempts ELSE 0 END, c.last_error, m.created_at
          FROM webhook_cursor c JOIN message m ON m.room_id = c.room_id AND m.seq > c.delivered_seq
        ON CONFLICT DO NOTHING
        """
    )
    op.drop_table("webhook_cursor")
