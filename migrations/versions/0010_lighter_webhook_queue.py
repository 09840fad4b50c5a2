"""A lighter webhook queue: dead letters in their own table, one index on the outbox, a NOTIFY
only when a room's queue was empty

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

The outbox of migration 0009 cost the chat's database more than the message it queued: three
index entries per item (the primary key and two partial indexes that left the dead letters out),
and a NOTIFY per transaction that woke every replica's deliverers (docs/benchmarks.md, round 11).

* ``webhook_dead_letter``: items given up on move here, so ``webhook_outbox`` holds only what is
  still to send and its primary key alone serves the deliverers' skip scan (each room's oldest
  item per receiver). ``ix_webhook_outbox_due`` and ``ix_webhook_outbox_pending`` go.
* ``chat_webhook_enqueue`` NOTIFYs ``chat_webhook`` only when a room's queue for a receiver held
  nothing but the item being sent (if that) before the statement. An item waiting unleased is
  one a deliverer will come to (the room's next after the one in flight, which its sender
  claims as soon as it is done, or one waiting out a backoff, whose timer wakes a worker), and
  the new one is behind it. The item in flight is not enough: its sender may look for the next
  one before this transaction commits, so a NOTIFY is sent then. A busy room with a slow
  receiver sends none at all.
* Autovacuum leaves the outbox's inserts alone (``autovacuum_vacuum_insert_threshold = -1``)
  and analyzes it only when it has doubled (``autovacuum_analyze_scale_factor = 1``): while a
  receiver is slow the outbox only grows, and the vacuums and analyzes that growth set off
  every few seconds, on a box shared with the chat, showed in the fanout's p99. A queue's rows
  are deleted soon after: inserts leave nothing for a vacuum to do that lasts, its deleted
  rows still set one off (the default dead-row threshold), and its one query walks its key
  whatever the statistics say.

Expand-only: the column ``webhook_outbox.dead_at`` stays (always NULL now) for replicas of the
release before, whose queries name it; one of them that gives up on an item during a rolling
upgrade leaves it in the outbox with ``dead_at`` set, and the new replicas send it again.
``compatible_from`` is 0009.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

compatible_from: str = "0009"

ENQUEUE = """
CREATE OR REPLACE FUNCTION chat_webhook_enqueue() RETURNS trigger
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

# Migration 0009's function, word for word, for the downgrade: a migration stands on its own file.
ENQUEUE_0009 = """
CREATE OR REPLACE FUNCTION chat_webhook_enqueue() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    v_queued bigint := 0;
    v_n bigint;
BEGIN
    IF COALESCE(current_setting('chat.webhook', true), '') = 'on' THEN
        INSERT INTO webhook_outbox (hook, room_id, seq)
        SELECT 'global', n.room_id, n.seq FROM chat_new_item n;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_queued := v_queued + v_n;
    END IF;
    IF EXISTS (SELECT FROM webhook) THEN
        INSERT INTO webhook_outbox (hook, room_id, seq)
        SELECT 'room', n.room_id, n.seq FROM chat_new_item n
        JOIN webhook w ON w.room_id = n.room_id;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_queued := v_queued + v_n;
    END IF;
    IF v_queued > 0 THEN
        PERFORM pg_notify('chat_webhook', '');
    END IF;
    RETURN NULL;
END
$fn$
"""


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE webhook_dead_letter (
            hook text NOT NULL,
            room_id bigint NOT NULL,
            seq bigint NOT NULL,
            attempts integer NOT NULL,
            last_error text,
            enqueued_at timestamptz NOT NULL,
            dead_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_webhook_dead_letter PRIMARY KEY (hook, room_id, seq),
            CONSTRAINT ck_webhook_dead_letter_hook_known CHECK (hook IN ('global', 'room'))
        )
        """
    )
    op.execute(
        """
        WITH dead AS (DELETE FROM webhook_outbox WHERE dead_at IS NOT NULL
                      RETURNING hook, room_id, seq, attempts, last_error, enqueued_at, dead_at)
        INSERT INTO webhook_dead_letter SELECT * FROM dead
        """
    )
    op.execute("DROP INDEX ix_webhook_outbox_due")
    op.execute("DROP INDEX ix_webhook_outbox_pending")
    op.execute(
        "ALTER TABLE webhook_outbox SET (autovacuum_vacuum_insert_threshold = -1,"
        " autovacuum_analyze_scale_factor = 1.0)"
    )
    op.execute(ENQUEUE)


def downgrade() -> None:
    op.execute(ENQUEUE_0009)
    op.execute(
        "ALTER TABLE webhook_outbox RESET (autovacuum_vacuum_insert_threshold,"
        " autovacuum_analyze_scale_factor)"
    )
    op.execute(
        "CREATE INDEX ix_webhook_outbox_due ON webhook_outbox (next_attempt_at) "
        "WHERE dead_at IS NULL"
    )
    op.execute(
        "CREATE INDEX ix_webhook_outbox_pending ON webhook_outbox (hook, room_id, seq) "
        "WHERE dead_at IS NULL"
    )
    op.execute(
        """
        INSERT INTO webhook_outbox (hook, room_id, seq, attempts, last_error, enqueued_at,
                                    dead_at)
        SELECT hook, room_id, seq, attempts, last_error, enqueued_at, dead_at
          FROM webhook_dead_letter
        ON CONFLICT DO NOTHING
        """
    )
    op.drop_table("webhook_dead_letter")
