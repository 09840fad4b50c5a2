"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision: str = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}

# The oldest revision whose code still works once this migration has run (docs/operations.md,
# "Upgrading"); env.py records it in the database, where older releases read it.
# - Expand-only (a new table, a nullable or defaulted column, a new index, a new function, a
#   function replaced with the same signature and results): the revision before this one, or
#   whatever floor that one declared if it is later. Replicas of the release before then stay
#   ready while the new release rolls out, and a rollback to it works.
# - Anything older code cannot live with (a column dropped, renamed or made NOT NULL without a
#   default, a changed function signature, rows rewritten in a form it cannot read): this
#   revision. Older replicas then report not ready and refuse to start ("needs code from
#   revision ... on"): split the change into an expand release and a later contract release
#   instead where you can.
compatible_from: str = ${repr(up_revision)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
