"""``EmbeddedPostgres``: the one object callers use, putting the parts together in order.

A start takes the data dir's start lock (``datadir``), then either reuses a server another
process runs on the same cluster (``process.running_port``), or makes the cluster if it is
missing (``cluster``) and launches one (``process``); last, it sets up the app role (``roles``).
The object keeps what one start made: the URLs and, if it launched the server, the process,
which ``stop()`` (or the interpreter's exit) stops.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

from service.db.embedded import cluster, process, roles, system_user
from service.db.embedded.binaries import bin_dir
from service.db.embedded.cluster import SUPERUSER
from service.db.embedded.datadir import DataDir
from service.db.embedded.errors import EmbeddedPostgresError
from service.db.embedded.process import Postmaster
from service.db.embedded.roles import APP_ROLE
from service.db.embedded.system_user import RunAs

log = logging.getLogger(__name__)

_PORT_ATTEMPTS = 3


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
        self._files = DataDir(self.data_dir)
        self._postmaster: Postmaster | None = None
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
            self._pgdata = cluster.place(self._files, system_user.run_as())
        return self._pgdata

    @property
    def log_path(self) -> Path:
        return self._files.log_path

    @property
    def password_path(self) -> Path:
        return self._files.password_path

    @property
    def app_password_path(self) -> Path:
        return self._files.app_password_path

    @property
    def owns_server(self) -> bool:
        """Whether this instance started the server (rather than reusing another's)."""
        return self._postmaster is not None and self._postmaster.running()

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
        with self._files.start_lock(deadline):
            try:
                self._start_locked(deadline, port)
            except BaseException:
                self.stop()
                raise
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT), then SIGKILL after ``timeout``. Idempotent; does nothing
        for a reused server or in a forked child process."""
        postmaster, self._postmaster = self._postmaster, None
        self._url = self._app_url = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if postmaster is not None:
            postmaster.stop(timeout)

    # -- starting --------------------------------------------------------------------------------

    def _start_locked(self, deadline: float, port: int | None) -> None:
        user = system_user.run_as()
        pgdata = self.pgdata
        running = process.running_port(pgdata, deadline)
        if running is not None:
            log.warning(
                "an embedded PostgreSQL already runs on %s (port %d), started by another "
                "process: reusing it; its lifetime is tied to that process, not this one",
                pgdata,
                running,
            )
            self._url = self._make_url(self._files.read_password(), running)
            process.wait_ready(self._admin_url(), self._postmaster, self._files, deadline)
        else:
            if not (pgdata / "PG_VERSION").exists():
                cluster.initdb(self._files, pgdata, user, deadline)
            cluster.check_ownership(pgdata, user)
            self._launch(pgdata, user, deadline, port)
        password = self._files.app_password()
        roles.provision(
            admin_url=self._admin_url(),
            superuser_url=self.superuser_url,
            database=self.database,
            password=password,
            deadline=deadline,
        )
        self._app_url = self._make_url(
            password, int(urlsplit(self.superuser_url).port or 0), user=APP_ROLE
        )

    def _launch(self, pgdata: Path, user: RunAs | None, deadline: float, port: int | None) -> None:
        """Launch the server and wait until it is ready; a free port another process took
        before postgres could bind it is replaced (up to ``_PORT_ATTEMPTS`` times)."""
        binaries = bin_dir(user)
        password = self._files.read_password()
        attempts = 1 if port else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            chosen = port or process.free_port()
            self._postmaster = Postmaster.spawn(
                bin_dir=binaries, pgdata=pgdata, port=chosen, user=user, data=self._files
            )
            atexit.register(self.stop)
            self._url = self._make_url(password, chosen)
            log.info("embedded PostgreSQL starting (pid %d, port %d)", self._postmaster.pid, chosen)
            try:
                process.wait_ready(self._admin_url(), self._postmaster, self._files, deadline)
                return
            except EmbeddedPostgresError:
                tail = self._files.log_tail()
                self.stop()
                port_taken = "could not create any TCP/IP sockets" in tail
                if not port_taken or attempt == attempts:
                    raise
                log.warning("port %d was taken before postgres could bind it: retrying", chosen)

    def _make_url(self, password: str, port: int, user: str = SUPERUSER) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{port}/{self.database}"

    def _admin_url(self) -> str:
        """The superuser's URL for the ``postgres`` database, which always exists."""
        return self.superuser_url.rsplit("/", 1)[0] + "/postgres"
