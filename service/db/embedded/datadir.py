"""The service's ``data_dir``: the files the embedded server keeps there, and who may read them.

What it guarantees:

* **Private files.** The superuser password (``pg-password``) and the app role's
  (``app-password``) are URL-safe random tokens, written whole (a temporary file, fsync, rename)
  with mode 0600: a crash never leaves half a password. The server log (``postgres.log``) is
  created 0600 and only ever appended to.
* **One start at a time.** ``start_lock`` serializes processes starting a server on the same
  ``data_dir`` (an ``flock`` on ``.start.lock``), so two first starts never both run ``initdb``
  or both launch a server.
* **A missing password is an error that says what to do**, never a silent new cluster.

The cluster itself (``pgdata``) is ``cluster.py``'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from service.db.embedded.errors import EmbeddedPostgresError

_LOG_TAIL_LINES = 40


class DataDir:
    """The files of one ``data_dir`` (the folder itself is made by ``EmbeddedPostgres.start``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def log_path(self) -> Path:
        return self.path / "postgres.log"

    @property
    def password_path(self) -> Path:
        """The superuser's password: without it an existing cluster cannot be reached."""
        return self.path / "pg-password"

    @property
    def app_password_path(self) -> Path:
        return self.path / "app-password"

    @contextlib.contextmanager
    def start_lock(self, deadline: float) -> Iterator[None]:
        """Serialize starts on one data dir across processes (initdb, port, reuse)."""
        fd = os.open(self.path / ".start.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedPostgresError(
                            f"another process is starting PostgreSQL on {self.path}"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- passwords -------------------------------------------------------------------------------

    def read_password(self) -> str:
        """The superuser's password, which the existing cluster was made with."""
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

    def new_password(self) -> str:
        """A new superuser password, kept before ``initdb`` uses it."""
        password = secrets.token_urlsafe(32)  # URL-safe: no quoting needed in the URL
        _write_private(self.password_path, password)
        return password

    def app_password(self) -> str:
        """The app role's password, made on first use (under the start lock). It is checked
        to be URL-safe base64, since it is written into a URL and an SQL statement."""
        path = self.app_password_path
        password = ""
        with contextlib.suppress(FileNotFoundError):
            password = path.read_text().strip()
        if not password:
            password = secrets.token_urlsafe(32)
            _write_private(path, password)
        if not password.replace("-", "").replace("_", "").isalnum():
            raise EmbeddedPostgresError(f"{path} holds unexpected characters")
        return password

    # -- the server log --------------------------------------------------------------------------

    def open_log(self) -> int:
        """A file descriptor appending to the server log, for a child's stdout and stderr."""
        return os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def append_log(self, text: str) -> None:
        with os.fdopen(self.open_log(), "a") as f:
            f.write(text)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The end of the server log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, mode 0600, durably and all at once."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
