"""Alembic, driven from code: ``chat-service migrate`` and the tests use it."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection

import service


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


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    """The newest migration this code ships."""
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    config = Config()
    config.set_main_option("script_location", str(script_location()))
    head = ScriptDirectory.from_config(config).get_current_head()
    if head is None:
        raise RuntimeError("no migrations found")
    return head


async def current_revision(conn: AsyncConnection) -> str | None:
    """The database's migration, or None before the first one."""
    try:
        return await conn.scalar(text("SELECT version_num FROM alembic_version"))
    except ProgrammingError:
        await conn.rollback()
        return None
