"""Alembic, driven from code: ``chat-service migrate`` and the tests use it.

Which schemas a release runs against (docs/operations.md, "Upgrading"): its own head, and any
later schema whose migrations all declare themselves compatible with it. Each migration after
0003 declares ``compatible_from``, the oldest revision whose code still works once it has run
(its own revision when it breaks older code). ``env.py`` records it, with the revision before,
in the table ``schema_compat`` as the migration is applied, and deletes it as it is reverted.
An older release does not have the newer migration files, so it reads the record from the
database: it walks from the database's revision back to its own head and accepts the schema
when every migration on the way declared a floor that the release knows (a floor at or before
its head; the history is linear).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection

import service

COMPAT_TABLE = "schema_compat"
"""One row per applied migration that declares ``compatible_from`` (the SQL below spells it)."""


def include_name(name: str | None, type_: str, _parent: object) -> bool:
    """Autogenerate, and any comparison of the models with the database, leaves the
    compatibility record alone: ``record_compatibility`` writes it, no model does."""
    return not (type_ == "table" and name == COMPAT_TABLE)


UNDECLARED = frozenset({"0001", "0002", "0003"})
"""Migrations written before the rule: they declare nothing (their releases demanded an exact
match anyway). Every later one must declare ``compatible_from``."""


def script_location() -> Path:
    """The wheel ships migrations as ``service/_migrations``; a checkout has ``migrations/``."""
    package_dir = Path(service.__file__).parent
    for candidate in (package_dir / "_migrations", package_dir.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise RuntimeError("alembic migrations not found")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    # ConfigParser interpolates '%': escape it (URL-encoded passwords contain it).
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head", *, location: Path | None = None) -> None:
    """``location``: another migrations directory (the tests bring later migrations)."""
    config = alembic_config(database_url)
    if location is not None:
        config.set_main_option("script_location", str(location))
    command.upgrade(config, revision)


def downgrade(database_url: str, revision: str = "base", *, location: Path | None = None) -> None:
    config = alembic_config(database_url)
    if location is not None:
        config.set_main_option("script_location", str(location))
    command.downgrade(config, revision)


def _scripts() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    return ScriptDirectory.from_config(config)


def head_revision() -> str:
    """The newest migration this code ships."""
    head = _scripts().get_current_head()
    if head is None:
        raise RuntimeError("no migrations found")
    return head


@dataclass(frozen=True)
class ReleaseSchema:
    """The schemas this release's code runs against: its head, and later ones declared
    compatible with it (the module docstring has the rule)."""

    head: str
    known: Collection[str]
    """Every revision this release ships: the head and its ancestors."""

    @classmethod
    def shipped(cls) -> ReleaseSchema:
        scripts = _scripts()
        head = scripts.get_current_head()
        if head is None:
            raise RuntimeError("no migrations found")
        return cls(head, frozenset(s.revision for s in scripts.walk_revisions()))

    async def problem(self, conn: AsyncConnection) -> str | None:
        """``None`` when this release can run against the database's schema, else why not."""
        revision = await current_revision(conn)
        if revision == self.head:
            return None
        if revision is None or revision in self.known:
            return (
                f"the database schema is at {revision or 'nothing'}, this version needs "
                f"{self.head}: run `chat-service migrate`"
            )
        return _later_schema_problem(revision, self.head, self.known, await _compat(conn))


def _later_schema_problem(
    revision: str, head: str, known: Collection[str], compat: dict[str, tuple[str | None, str]]
) -> str | None:
    """The database is at a revision this release does not ship: walk its recorded history
    back to a revision we know; every migration on the way must accept our head."""
    current: str | None = revision
    for _ in range(len(compat) + 1):  # a cycle in a hand-edited table cannot loop forever
        if current in known:
            break
        if current not in compat:
            return (
                f"the database schema is at {revision}, which this release (at {head}) does not "
                f"know and which records no compatibility for {current}: run the release that "
                "migrated it"
            )
        current, floor = compat[current]
        if floor not in known:
            return (
                f"the database schema is at {revision}, which needs code from revision {floor} "
                f"on (this release is at {head}): run a newer release, or downgrade the schema"
            )
    if current != head:
        return (
            f"the database schema is at {revision}, which does not descend from this release's "
            f"head {head}: run the release that migrated it"
        )
    return None


async def _compat(conn: AsyncConnection) -> dict[str, tuple[str | None, str]]:
    """The database's compatibility record: revision -> (revision before it, floor)."""
    if await conn.scalar(text("SELECT to_regclass('schema_compat')")) is None:
        return {}
    rows = await conn.execute(
        text("SELECT revision, down_revision, compatible_from FROM schema_compat")
    )
    return {rev: (down, floor) for rev, down, floor in rows}


def record_compatibility(ctx: Any, step: Any, heads: Any, run_args: Any) -> None:
    """Alembic's ``on_version_apply`` hook (env.py): record an applied migration's
    ``compatible_from`` in the same transaction, or delete it as the migration is reverted.
    A migration that declares none, or a floor that is not itself or one of its ancestors, is
    refused (its transaction rolls back)."""
    if not step.is_migration:
        return  # a stamp runs no migration: it records nothing
    conn: Connection = ctx.connection
    script = step.up_revision
    revision = script.revision
    if not step.is_upgrade:
        if conn.scalar(text("SELECT to_regclass('schema_compat')")) is not None:
            conn.execute(text("DELETE FROM schema_compat WHERE revision = :r"), {"r": revision})
            if not conn.scalar(text("SELECT count(*) FROM schema_compat")):
                conn.execute(text("DROP TABLE schema_compat"))
        return
    floor = getattr(script.module, "compatible_from", None)
    if floor is None:
        if revision in UNDECLARED:
            return
        raise RuntimeError(
            f'migration {revision} declares no compatible_from (docs/operations.md, "Upgrading")'
        )
    if not isinstance(script.down_revision, str | None):
        raise RuntimeError(f"migration {revision}: the compatibility record needs one parent")
    lineage, ancestor = set(), script
    while ancestor is not None:
        lineage.add(ancestor.revision)
        down = ancestor.down_revision
        ancestor = step.revision_map.get_revision(down) if isinstance(down, str) else None
    if floor not in lineage:
        raise RuntimeError(
            f"migration {revision}: compatible_from {floor!r} is neither {revision} nor one of "
            "its ancestors"
        )
    conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS schema_compat (revision text PRIMARY KEY, "
            "down_revision text, compatible_from text NOT NULL)"
        )
    )
    conn.execute(
        text(
            "INSERT INTO schema_compat (revision, down_revision, compatible_from) "
            "VALUES (:r, :d, :f) ON CONFLICT (revision) DO UPDATE SET "
            "down_revision = EXCLUDED.down_revision, compatible_from = EXCLUDED.compatible_from"
        ),
        {"r": revision, "d": script.down_revision, "f": floor},
    )


async def current_revision(conn: AsyncConnection) -> str | None:
    """The database's migration, or None before the first one."""
    try:
        revision: str | None = await conn.scalar(text("SELECT version_num FROM alembic_version"))
        return revision
    except ProgrammingError:
        await conn.rollback()
        return None
