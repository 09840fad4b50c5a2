"""Outgoing webhooks: a transactional outbox of stream items, and per-room registrations

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

Every stream item is a ``message`` row (text, member, edit, delete, reaction), inserted by one
of three functions (``chat_post_messages``, ``chat_post_event``, ``chat_append_member``). One
statement-level trigger on ``message`` (``chat_webhook_enqueue``) therefore sees every item of
every kind, in the transaction that stores it and gives it its seq, without touching those
functions: what is committed is queued, and what is queued was committed.

* ``webhook``: a room's own receiver (``PUT /rooms/{room}/webhook``, service admins only).
* ``webhook_outbox``: one row per stream item and receiver still to deliver: ``hook`` is
  ``global`` (the replica's ``CHAT_WEBHOOK_URL``) or ``room`` (the room's ``webhook`` row). It
  holds a pointer (room id, seq), not the payload: the payload is the item's frame
  (``chat_message_json``, the one definition) read when it is sent, so a delete, which erases
  its target's text and its edits' in the ``message`` rows, redacts the queued copies too.
  Delivered rows are deleted; a row given up on keeps ``dead_at`` (the dead letters). A row
  being sent carries its sender's lease (``lease_owner`` until ``leased_until``).

The trigger queues ``global`` rows only for a connection that sets ``chat.webhook = 'on'`` (a
replica with ``CHAT_WEBHOOK_URL`` sets it on its connections), ``room`` rows only for rooms with
a ``webhook`` row. Otherwise it costs one call per statement that reads a setting and probes an
empty table. It NOTIFYs ``chat_webhook`` when it queued something, so deliverers wake at once.

Expand-only (new tables, a new trigger that older code never sees): ``compatible_from`` is 0008.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

compatible_from: str = "0008"

ENQUEUE = """
CREATE FUNCTION chat_webhook_enqueue() RETURNS trigger
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
        CREATE TABLE webhook (
            room_id bigint NOT NULL,
            url text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_webhook PRIMARY KEY (room_id),
            CONSTRAINT fk_webhook_room_id_room FOREIGN KEY (room_id)
                REFERENCES room (id) ON DELETE CASCADE
        )
        """
    )
    op.execute(
        """
        CREATE TABLE webhook_outbox (
            hook text NOT NULL,
            room_id bigint NOT NULL,
            seq bigint NOT NULL,
            enqueued_at timestamptz NOT NULL DEFAULT now(),
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            last_error text,
            dead_at timestamptz,
            leased_until timestamptz,
            lease_owner text,
            CONSTRAINT pk_webhook_outbox PRIMARY KEY (hook, room_id, seq),
            CONSTRAINT ck_webhook_outbox_hook_known CHECK (hook IN ('global', 'room'))
        )
        """
    )
    # The deliverers' two questions: which items are due, and is there an earlier one of the
    # same room still pending. Dead letters are in neither.
    op.execute(
        "CREATE INDEX ix_webhook_outbox_due ON webhook_outbox (next_attempt_at) "
        "WHERE dead_at IS NULL"
    )
    op.execute(
        "CREATE INDEX ix_webhook_outbox_pending ON webhook_outbox (hook, room_id, seq) "
        "WHERE dead_at IS NULL"
    )
    op.execute(ENQUEUE)
    op.execute(
        """
        CREATE TRIGGER trg_message_webhook AFTER INSERT ON message
        REFERENCING NEW TABLE AS chat_new_item
        FOR EACH STATEMENT EXECUTE FUNCTION chat_webhook_enqueue()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER trg_message_webhook ON message")
    op.execute("DROP FUNCTION chat_webhook_enqueue()")
    op.drop_table("webhook_outbox")
    op.drop_table("webhook")
