"""Presence: who has a socket open to which room, on which replica

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

Presence is a signal, not a stream item (../shared/DESIGN.md): never replayed, gone with the
process that holds the socket. These tables are its shared state across replicas
(``service.chat.presence``):

* ``presence_replica``: each running process, with the time its presence expires. A process
  moves it forward with a heartbeat; one that stops (kill -9, a partition) is deleted by any
  other once it has passed, and its users with it.
* ``presence``: one row per user present in a room, with the replicas that hold a socket of
  theirs (or held one within the grace period). A row appears when the first replica adds
  itself and goes when the last removes itself: the row lock is what makes "online" and
  "offline" exact across replicas, each reported by exactly one of them.

Both are UNLOGGED: nothing here must survive a crash of PostgreSQL (which empties them; each
replica then finds its registration gone and writes its users again), and presence writes
cost no WAL.

Expand-only (two new tables): ``compatible_from`` is 0007.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

compatible_from: str = "0007"


def upgrade() -> None:
    op.execute(
        """
        CREATE UNLOGGED TABLE presence_replica (
            id text CONSTRAINT pk_presence_replica PRIMARY KEY,
            expires_at timestamptz NOT NULL
        )
        """
    )
    op.execute(
        """
        CREATE UNLOGGED TABLE presence (
            room text NOT NULL,
            user_id text NOT NULL,
            name text,
            replicas text[] NOT NULL,
            CONSTRAINT pk_presence PRIMARY KEY (room, user_id)
        )
        """
    )


def downgrade() -> None:
    op.drop_table("presence")
    op.drop_table("presence_replica")
