"""The one error of the embedded server, so that callers catch one type whatever part failed.

It is a ``DatabaseUnreachable``: the CLI reports it like any unreachable database and exits with 3.
"""

from __future__ import annotations

from service.errors import DatabaseUnreachable


class EmbeddedPostgresError(DatabaseUnreachable):
    """The embedded server could not be set up, started or reached (the CLI exits with 3)."""
