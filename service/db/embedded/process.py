"""The ``postgres`` process: starting it, knowing when it is ready, stopping it, finding one.

What it guarantees:

* **Private.** The server listens on 127.0.0.1 only, on the port it is given, with no unix
  socket; ``fsync`` stays on.
* **Dies with its parent.** ``postgres`` is a direct child with ``PR_SET_PDEATHSIG``: when the
  process that started it exits, even by ``kill -9``, the server gets SIGINT (a fast, clean
  shutdown). Children are forked by one thread that lives as long as the process, since the
  death signal follows the forking *thread*: ``Postmaster.spawn`` may be called from any thread.
  The server runs in its own session, so a Ctrl-C in the terminal reaches the service only,
  which stops the server after its own shutdown.
* **Ready means reachable.** ``wait_ready`` returns once an authenticated connection succeeds,
  and fails at once, with the end of the log, when the server exits or rejects the password.
* **Stopped once, by its owner.** ``Postmaster.stop`` sends SIGINT, then SIGKILL after its
  timeout; in a forked child process it does nothing.
* **Another process's server is found, a dead one's traces are not trusted.** ``running_port``
  reports the port of a live postmaster serving the same cluster (by file identity, so a
  symlinked path counts); a stopping one is waited for. A ``postmaster.pid`` whose pid now
  belongs to another program, or that stays unreadable for a second, is removed, since postgres
  would refuse to start; any other is left to postgres.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from service.db.embedded.binaries import child_env
from service.db.embedded.blocking import run
from service.db.embedded.datadir import DataDir
from service.db.embedded.errors import EmbeddedPostgresError
from service.db.embedded.system_user import RunAs, credentials

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class Postmaster:
    """A ``postgres`` server this process started (see the module's guarantees)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._owner_pid = os.getpid()

    @classmethod
    def spawn(
        cls, *, bin_dir: Path, pgdata: Path, port: int, user: RunAs | None, data: DataDir
    ) -> Postmaster:
        """Start ``postgres`` on ``pgdata`` and ``port``, its output appended to the log."""
        argv = [
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
            "-c",
            "fsync=on",
        ]
        log_fd = data.open_log()
        try:
            proc = _SPAWNER.popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                cwd=pgdata,
                env=child_env(),
                start_new_session=True,  # Ctrl-C reaches the service, which stops us
                preexec_fn=_die_with_parent(os.getpid()),
                **credentials(user),
            )
        finally:
            os.close(log_fd)
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float) -> None:
        """Fast shutdown (SIGINT), then SIGKILL after ``timeout``. Does nothing once the server
        exited, or in a forked child of the process that started it."""
        proc = self.proc
        if self._owner_pid != os.getpid() or proc.poll() is not None:
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


def free_port() -> int:
    """A port free on 127.0.0.1 now (another process may take it before postgres binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    admin_url: str, postmaster: Postmaster | None, data: DataDir, deadline: float
) -> None:
    """Poll until the server accepts an authenticated connection to ``admin_url``; if
    ``postmaster`` is given and exits, fail at once with the end of its log."""

    async def ping() -> None:
        conn = await asyncpg.connect(admin_url, timeout=2)
        await conn.close()

    while True:
        if postmaster is not None and not postmaster.running():
            raise EmbeddedPostgresError(
                f"postgres exited with code {postmaster.proc.returncode}; last lines of "
                f"{data.log_path}:\n{data.log_tail()}"
            )
        try:
            run(ping)
            return
        except (
            asyncpg.InvalidPasswordError,
            asyncpg.InvalidAuthorizationSpecificationError,
        ) as exc:
            raise EmbeddedPostgresError(
                f"the server rejects the password in {data.password_path}: {exc}"
            ) from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"the embedded PostgreSQL was not ready in time; last lines of "
                    f"{data.log_path}:\n{data.log_tail()}"
                ) from None
            time.sleep(0.05)


def running_port(pgdata: Path, deadline: float) -> int | None:
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
"""The process's one spawner: its thread starts on first use (none at import)."""
