"""Rolling upgrades (docs/operations.md, "Upgrading"): this release keeps serving on a later
schema that declares itself compatible with it, and says clearly when one does not.

The later migrations are the tests' own: a copy of this release's migrations directory with
more files, applied through the same env.py that ``chat-service migrate`` runs. The server under
test ships only this release's files, as an older replica would after a newer ``migrate``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from service.config import to_sqlalchemy_url
from service.db.migrate import (
    ReleaseSchema,
    _later_schema_problem,
    current_revision,
    downgrade,
    head_revision,
    script_location,
    upgrade,
)
from tests.support import JWT_SECRET, ServerProcess, make_token

HEAD = head_revision()
NEXT, AFTER = f"{int(HEAD) + 1:04d}", f"{int(HEAD) + 2:04d}"

EXPAND = (
    "ALTER TABLE message ADD COLUMN pinned_at timestamptz",
    "ALTER TABLE message DROP COLUMN pinned_at",
)
"""Expand-only: this release never names the column, so it works on either side of it."""


def later_migrations(tmp_path: Path, *migrations: tuple[str, str | None, tuple[str, str]]) -> Path:
    """This release's migrations plus ``(revision, compatible_from, (up, down))`` after them."""
    location = tmp_path / "migrations"
    shutil.copytree(script_location(), location, ignore=shutil.ignore_patterns("__pycache__"))
    down = HEAD
    for revision, floor, (up_sql, down_sql) in migrations:
        declared = "" if floor is None else f"compatible_from = {floor!r}\n"
        (location / "versions" / f"{revision}_later.py").write_text(
            f'"""A later migration of the tests."""\n\nfrom alembic import op\n\n'
            f"revision = {revision!r}\ndown_revision = {down!r}\nbranch_labels = None\n"
            f"depends_on = None\n{declared}\n\n"
            f"def upgrade() -> None:\n    op.execute({up_sql!r})\n\n\n"
            f"def downgrade() -> None:\n    op.execute({down_sql!r})\n"
        )
        down = revision
    return location


async def _problem(url: str) -> tuple[str | None, str | None]:
    """(the database's revision, why this release's code cannot run against it)"""
    engine = create_async_engine(to_sqlalchemy_url(url))
    try:
        async with engine.connect() as conn:
            return await current_revision(conn), await ReleaseSchema.shipped().problem(conn)
    finally:
        await engine.dispose()


async def _tables(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return sorted(r["tablename"] for r in rows)
    finally:
        await conn.close()


def problem(url: str) -> tuple[str | None, str | None]:
    return asyncio.run(_problem(url))


def readyz(server: ServerProcess) -> httpx.Response:
    return httpx.get(f"{server.http}/readyz", timeout=10)


def serve_once(url: str) -> subprocess.CompletedProcess[str]:
    """``chat-service serve`` as an operator runs it; a refused start exits before binding."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env |= {"CHAT_DATABASE_URL": url, "CHAT_JWT_SECRET": JWT_SECRET, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    entry = json.loads(lines[0])
    assert entry["level"] == "error" and "exc" not in entry, entry
    return str(entry["msg"])


def post(server: ServerProcess, room: str, body: str) -> httpx.Response:
    return httpx.post(
        f"{server.http}/rooms/{room}/messages",
        json={"body": body},
        headers={"Authorization": f"Bearer {make_token('alice')}"},
        timeout=10,
    )


def test_a_later_expand_only_schema_keeps_this_release_ready(
    own_database: str, tmp_path: Path, room: str
) -> None:
    """``migrate`` of the next release runs while this one serves: it stays ready and keeps
    storing messages; a replica of it that restarts then starts; a rollback to it works."""
    location = later_migrations(tmp_path, (NEXT, HEAD, EXPAND))
    with ServerProcess(own_database, log_path=tmp_path / "server.log") as server:
        assert readyz(server).status_code == 200
        upgrade(own_database, location=location)
        assert problem(own_database) == (NEXT, None)
        ready = readyz(server)
        assert ready.status_code == 200, ready.text
        assert post(server, room, "after the expand").status_code == 201
        with ServerProcess(own_database, log_path=tmp_path / "restarted.log") as restarted:
            assert readyz(restarted).status_code == 200
            assert post(restarted, room, "from the restarted replica").status_code == 201
    assert "not ready" not in (tmp_path / "server.log").read_text()
    downgrade(own_database, HEAD, location=location)
    assert problem(own_database) == (HEAD, None)


def test_a_breaking_schema_makes_this_release_not_ready_and_refuse_to_start(
    own_database: str, tmp_path: Path
) -> None:
    """A migration that declares itself incompatible with this release's code: the running
    replica reports not ready (the reason in its log only), a restarted one exits with 4 and one
    line, and once the migration is reverted the replica is ready again."""
    location = later_migrations(tmp_path, (NEXT, NEXT, EXPAND))
    log_path = tmp_path / "server.log"
    with ServerProcess(own_database, log_path=log_path) as server:
        assert readyz(server).status_code == 200
        upgrade(own_database, location=location)
        answer = readyz(server)
        assert answer.status_code == 503
        assert answer.json()["checks"] == {"database": "failing", "listen": "ok"}
        assert NEXT not in answer.text  # the reason goes to the log, not to whoever asks
        reason = f"the database schema is at {NEXT}, which needs code from revision {NEXT} on"
        assert f"not ready: database check fails: {reason}" in log_path.read_text()

        refused = serve_once(own_database)
        assert refused.returncode == 4
        assert reason in one_error_line(refused)

        downgrade(own_database, HEAD, location=location)
        assert readyz(server).status_code == 200


def test_every_later_migration_on_the_way_must_accept_this_release(
    own_database: str, tmp_path: Path
) -> None:
    """An expand after a breaking migration does not make the schema compatible again: the
    code walks the recorded history back to its own head."""
    nothing = ("SELECT 1", "SELECT 1")
    location = later_migrations(tmp_path, (NEXT, NEXT, EXPAND), (AFTER, NEXT, nothing))
    upgrade(own_database, location=location)
    revision, why = problem(own_database)
    assert revision == AFTER
    assert why is not None and f"needs code from revision {NEXT} on" in why

    downgrade(own_database, "base", location=location)
    assert asyncio.run(_tables(own_database)) == ["alembic_version"]  # the record went too
    upgrade(own_database)
    assert problem(own_database) == (HEAD, None)


def test_a_schema_behind_the_head_still_refuses_to_start(fresh_database) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database()
    upgrade(url, f"{int(HEAD) - 1:04d}")
    refused = serve_once(url)
    assert refused.returncode == 4
    message = one_error_line(refused)
    assert f"this version needs {HEAD}: run `chat-service migrate`" in message


@pytest.mark.parametrize(
    ("floor", "says"),
    [(None, "declares no compatible_from"), ("0999", "is neither"), ("nonsense", "is neither")],
)
def test_migrate_refuses_a_migration_without_a_valid_floor(
    own_database: str, tmp_path: Path, floor: str | None, says: str
) -> None:
    """The rule is enforced where the next migration is written and run: its transaction rolls
    back, and the database stays where it was."""
    location = later_migrations(tmp_path, (NEXT, floor, EXPAND))
    with pytest.raises(RuntimeError, match=says):
        upgrade(own_database, location=location)
    assert problem(own_database) == (HEAD, None)


def test_a_later_schema_without_a_record_or_from_another_line_is_refused() -> None:
    """What an older release concludes from the database's record alone."""
    known = {"0001", "0002", "0003"}
    assert "records no compatibility for 0004" in str(
        _later_schema_problem("0004", "0003", known, {})
    )
    # 0005 was recorded but the 0004 it descends from was not (e.g. stamped)
    assert "records no compatibility for 0004" in str(
        _later_schema_problem("0005", "0003", known, {"0005": ("0004", "0003")})
    )
    # a line that left ours at 0002: not a descendant of our head, whatever its floors say
    assert "does not descend from this release's head 0003" in str(
        _later_schema_problem("0004", "0003", known, {"0004": ("0002", "0002")})
    )
    # a hand-edited cycle ends, refused
    cycle = {"0004": ("0005", "0003"), "0005": ("0004", "0003")}
    assert _later_schema_problem("0004", "0003", known, cycle) is not None
    chain = {"0004": ("0003", "0003"), "0005": ("0004", "0002")}
    assert _later_schema_problem("0005", "0003", known, chain) is None
