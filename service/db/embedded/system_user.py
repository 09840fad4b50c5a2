"""Who PostgreSQL runs as, and what that user can reach: ourselves, or as root a user of its own.

PostgreSQL refuses to run as root, so as root it runs as the system user ``chat-postgres``
(not ``nobody``, which other daemons share). What this module guarantees:

* **The user exists once.** ``run_as()`` creates it with ``useradd --system`` on first use, under
  a lock file, so concurrent first starts in several processes make it once.
* **Reachability as the kernel sees it.** ``searchable_by`` follows the owner, group or other
  bits that apply at each folder from ``/`` down; the child runs with no supplementary groups
  (``credentials``), so none are counted.
* **Only what is ours changes.** ``make_system_dir`` makes ``SYSTEM_DIR`` and folders in it;
  ``chown_tree`` hands a cluster over without following symlinks. Parents of the service's
  folders are never chmod-ed or chown-ed.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

from service.db.embedded.errors import EmbeddedPostgresError

log = logging.getLogger(__name__)

SYSTEM_DIR = Path("/var/lib/chat-service")
"""Where root keeps what the PostgreSQL user could not reach elsewhere (binaries, data)."""
UNPRIVILEGED_USER = "chat-postgres"
"""The system user (and group) PostgreSQL runs as when the service runs as root."""
LEGACY_USER = "nobody"
"""What older versions ran PostgreSQL as: their clusters are chown-ed to UNPRIVILEGED_USER."""


class RunAs(NamedTuple):
    """The account PostgreSQL runs as when this process is root."""

    uid: int
    gid: int


def run_as() -> RunAs | None:
    """The PostgreSQL system user when root (created on first use), else ``None`` (run as
    ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        create_system_user()
        user = pwd.getpwnam(UNPRIVILEGED_USER)
    return RunAs(user.pw_uid, user.pw_gid)


def credentials(user: RunAs | None) -> dict[str, Any]:
    """``subprocess`` arguments that run a child as ``user`` with no supplementary groups."""
    if user is None:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def create_system_user() -> None:
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


def permits(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    """Whether the owner/group/other class that applies to ``uid``/``gid`` has all of ``bits``
    (given as ``S_IRUSR``/``S_IWUSR``/``S_IXUSR``-style owner bits)."""
    if st.st_uid == uid:
        mask = bits
    elif st.st_gid == gid:
        mask = bits >> 3
    else:
        mask = bits >> 6
    return st.st_mode & mask == mask


def searchable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether a process of ``uid``/``gid`` (no supplementary groups) can traverse every folder
    from ``/`` down to ``path`` included, following the owner, group or other execute bit that
    applies to it at each level."""
    path = Path(os.path.abspath(path))
    for folder in [path, *path.parents]:
        try:
            st = folder.stat()
        except OSError:
            return False
        if not permits(st, uid, gid, stat.S_IXUSR):
            return False
    return True


def make_system_dir(path: Path, mode: int) -> None:
    """``SYSTEM_DIR`` (0755) and ``path`` in it with ``mode``, where they are missing."""
    for folder, folder_mode in ((SYSTEM_DIR, 0o755), (path, mode)):
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(folder_mode)  # explicit: mkdir's mode is filtered by the umask


def chown_tree(top: Path, uid: int, gid: int) -> None:
    """``chown -R`` without following symlinks (a cluster holds none of its own)."""
    os.lchown(top, uid, gid)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)
