"""The cluster (``pgdata``): where it lives, how it is made, and that it is PostgreSQL's alone.

What it guarantees:

* **Durable data in one place.** The cluster is ``data_dir/pgdata``. As root, when the
  PostgreSQL user cannot traverse the folders above ``data_dir``, it goes to
  ``SYSTEM_DIR/data-<hash of data_dir>`` instead, with a warning (password and log stay in
  ``data_dir``); a cluster found in either place keeps being used there.
* **Never half made.** ``initdb`` runs in a sibling folder renamed to ``pgdata`` when it
  succeeded (the rename made durable): a cluster exists exactly when ``pgdata/PG_VERSION`` does.
  Its superuser is ``postgres``, with scram-sha-256 and the password from ``data_dir``.
* **Private.** ``check_ownership`` makes ``pgdata`` 0700 and refuses to start a cluster another
  user owns; a cluster an older version ran as ``nobody`` is handed to ``chat-postgres``. The
  folders above ``data_dir`` are never changed; as root, ``data_dir`` itself gets the PostgreSQL
  user's group and mode 0710, so that user can traverse it and nobody else can.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import time
from pathlib import Path

from service.db.embedded import system_user
from service.db.embedded.binaries import bin_dir, child_env
from service.db.embedded.datadir import DataDir
from service.db.embedded.errors import EmbeddedPostgresError
from service.db.embedded.system_user import RunAs, chown_tree, credentials, searchable_by

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
"""The cluster's superuser, made by ``initdb``: administration only, never the service's."""


def place(data: DataDir, user: RunAs | None) -> Path:
    """``data_dir/pgdata``, unless root and its system user cannot get to it."""
    local = data.path / "pgdata"
    if user is None:
        return local
    data.path.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(data.path).encode()).hexdigest()[:16]
    fallback = system_user.SYSTEM_DIR / f"data-{digest}" / "pgdata"
    reachable = searchable_by(data.path.parent, *user)
    if (local / "PG_VERSION").exists() or (reachable and not (fallback / "PG_VERSION").exists()):
        if not reachable:
            raise EmbeddedPostgresError(
                f"{local} holds a cluster, but {system_user.UNPRIVILEGED_USER!r} (which "
                "PostgreSQL runs as, since this process is root) cannot traverse the folders "
                "above it"
            )
        # data_dir is ours (never its parents): PostgreSQL's user may traverse it (as its
        # group), nobody else may even do that
        st = data.path.stat()
        if st.st_gid != user.gid:
            os.chown(data.path, -1, user.gid)
        if stat.S_IMODE(st.st_mode) & 0o077 != 0o010:
            data.path.chmod(stat.S_IMODE(st.st_mode) & 0o700 | 0o010)
        return local
    log.warning(
        "PostgreSQL runs as %r (this process is root), which cannot traverse the folders "
        "above %s: keeping its data in %s instead (password and log stay in %s)",
        system_user.UNPRIVILEGED_USER,
        data.path,
        fallback,
        data.path,
    )
    system_user.make_system_dir(fallback.parent, 0o711)
    if not searchable_by(fallback.parent, *user):
        raise EmbeddedPostgresError(
            f"{system_user.UNPRIVILEGED_USER!r} cannot traverse {fallback.parent}"
        )
    return fallback


def initdb(data: DataDir, pgdata: Path, user: RunAs | None, deadline: float) -> None:
    """Create the cluster in a sibling folder, then rename it to ``pgdata``: an interrupted
    initdb never leaves a half-made cluster that later starts would take for a real one."""
    binaries = bin_dir(user)
    staging = pgdata.with_name(f"{pgdata.name}.initdb")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir(mode=0o700)
    staging.chmod(0o700)
    if user is not None:
        os.chown(staging, *user)
    password = data.new_password()
    pwfile = data.password_path
    if user is not None:  # that user cannot read ours: hand it a copy it owns, next to pgdata
        pwfile = pgdata.parent / f".initdb-pw-{secrets.token_hex(8)}"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password)
        os.chown(pwfile, *user)
    log.info("initializing the embedded PostgreSQL cluster in %s", pgdata)
    started = time.monotonic()
    argv = [
        str(binaries / "initdb"),
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
            env=child_env(),
            timeout=max(deadline - time.monotonic(), 30.0),
            **credentials(user),
        )
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise EmbeddedPostgresError(f"initdb did not finish in {exc.timeout:.0f}s") from exc
    finally:
        if pwfile != data.password_path:
            pwfile.unlink(missing_ok=True)
    data.append_log(result.stdout + result.stderr)
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


def check_ownership(pgdata: Path, user: RunAs | None) -> None:
    """The cluster belongs to the user PostgreSQL runs as, and only to it (0700)."""
    st = pgdata.stat()
    if stat.S_IMODE(st.st_mode) != 0o700:
        log.warning("%s was mode %o: making it 0700", pgdata, stat.S_IMODE(st.st_mode))
        try:
            pgdata.chmod(0o700)
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot make {pgdata} private: {exc}") from None
    if user is None:
        return
    try:
        legacy = pwd.getpwnam(system_user.LEGACY_USER).pw_uid
    except KeyError:
        legacy = None
    if st.st_uid == legacy and legacy != user.uid:
        log.warning(
            "%s was made by an older version, which ran PostgreSQL as %r: handing it to %r",
            pgdata,
            system_user.LEGACY_USER,
            system_user.UNPRIVILEGED_USER,
        )
        chown_tree(pgdata, *user)
        st = pgdata.stat()
    if st.st_uid != user.uid:
        raise EmbeddedPostgresError(
            f"{pgdata} belongs to uid {st.st_uid}, but this root process runs PostgreSQL "
            f"as {system_user.UNPRIVILEGED_USER!r} (uid {user.uid}); chown it or run as its owner"
        )
