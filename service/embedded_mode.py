"""Embedded mode: with no ``CHAT_DATABASE_URL``, run a private PostgreSQL in ``CHAT_DATA_DIR``.

The JWT secret is generated once by ``serve`` (or ``migrate``) and kept beside the data
(``jwt-secret``, mode 0600), so tokens stay valid across restarts; ``token`` only ever reads it
(a secret it made up would sign tokens no running service accepts). Dev logins default to on
when the service listens on loopback. The server is started by the process that calls
``resolved_settings`` and dies with it.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import SecretStr

from service.config import Settings
from service.errors import InvalidSettings

log = logging.getLogger(__name__)


def read_or_create_secret(data_dir: Path) -> str:
    path = data_dir / "jwt-secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def with_local_secret(settings: Settings) -> Settings:
    """Embedded mode without CHAT_JWT_SECRET: use the one kept in the data dir."""
    if settings.database_url is not None or settings.jwt_secret is not None:
        return settings
    secret = read_or_create_secret(settings.data_dir)
    return settings.model_copy(update={"jwt_secret": SecretStr(secret)})


def local_secret_path(settings: Settings) -> Path | None:
    """Where ``token`` looks for the embedded mode's secret (``None`` outside embedded mode)."""
    if settings.database_url is not None:
        return None
    return settings.data_dir.resolve() / "jwt-secret"


def with_existing_secret(settings: Settings) -> Settings:
    """Like ``with_local_secret``, but never creates one."""
    path = local_secret_path(settings)
    if settings.jwt_secret is not None or path is None:
        return settings
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        return settings
    except OSError as exc:
        raise InvalidSettings(f"cannot read {path}: {exc.strerror}") from None
    return settings.model_copy(update={"jwt_secret": SecretStr(secret)}) if secret else settings


@contextmanager
def resolved_settings(settings: Settings) -> Iterator[Settings]:
    """Yield settings with a database URL, starting the embedded server for the duration."""
    if settings.database_url is not None:
        yield settings
        return
    from service.db.embedded import EmbeddedPostgres  # noqa: PLC0415 - only embedded mode needs it

    settings = with_local_secret(settings)
    server = EmbeddedPostgres(settings.data_dir)
    url = server.start()
    log.info("embedded PostgreSQL running from %s", settings.data_dir)
    try:
        yield settings.model_copy(update={"database_url": url, "embedded": True})
    finally:
        server.stop()


def export(settings: Settings) -> None:
    """Put resolved settings in the environment, for uvicorn worker processes to read."""
    os.environ["CHAT_DATABASE_URL"] = settings.require_database_url()
    if settings.jwt_secret is not None:
        os.environ["CHAT_JWT_SECRET"] = settings.jwt_secret.get_secret_value()
    os.environ["CHAT_EMBEDDED"] = "true" if settings.embedded else "false"
    if settings.listen_host is not None:
        os.environ["CHAT_LISTEN_HOST"] = settings.listen_host
    else:
        os.environ.pop("CHAT_LISTEN_HOST", None)
