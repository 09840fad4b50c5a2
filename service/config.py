"""Settings: the one typed object read from the environment (prefix ``CHAT_``).

Nothing here runs at import time. ``Settings()`` is built by the CLI or ``create_app`` and passed
down; no module keeps a global copy. With no ``CHAT_DATABASE_URL`` the service is in *embedded
mode*: the CLI starts a private PostgreSQL in ``CHAT_DATA_DIR`` and fills in the database URL and a
generated JWT secret (see ``service.embedded_mode``). Outside embedded mode unsafe defaults are
refused instead of silently accepted.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOM_NAME_PATTERN = (
    "^(?:"
    + "|".join(rf"\.{{{k}}}[A-Za-z0-9_-][A-Za-z0-9_.-]{{0,{63 - k}}}" for k in range(64))
    + ")$"
)
"""Room names and dev-login user names: safe in URLs, logs and channel names. 1 to 64 of
``A-Z a-z 0-9 _ . -``, not only dots: URL normalisation (RFC 3986) removes ``.`` and ``..``
segments from paths, so a REST client could never reach such a room. (Spelled out per number
of leading dots: pydantic's regex engine has no look-ahead.)"""

_MIN_SECRET_BYTES = 32
_KNOWN_WEAK_SECRETS = {"changeme", "changethis", "secret", "password", "test", "dev"}


class Settings(BaseSettings):
    """Every knob of the service. Each field is documented in the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="CHAT_", extra="ignore")

    database_url: str | None = None
    broadcast_url: str | None = None
    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    dev_auth: bool | None = None
    history_limit: int = Field(default=50, ge=0, le=500)
    max_message_chars: int = Field(default=4000, ge=1, le=100_000)
    data_dir: Path = Path(".chat-data")
    outbox_limit: int = Field(default=1000, ge=16)
    """Frames queued for one websocket before it counts as a slow consumer and is closed (1013)."""
    db_pool_size: int = Field(default=10, ge=1)
    allowed_origins: str = ""
    """Comma-separated origins (``https://chat.example.com``) allowed to open a websocket with
    the ``session`` cookie, besides the service's own origin. Guards against cross-site
    websocket hijacking; header and query tokens are not ambient, so they are not checked."""
    send_rate: float = Field(default=10.0, gt=0)
    """Messages per second one connection may send (token bucket; bursts of twice this)."""
    user_send_rate: float = Field(default=20.0, gt=0)
    """Messages per second one user may send across all its connections on a process."""
    max_connections_per_user: int = Field(default=20, ge=1)
    """Concurrent websockets one user may hold on one process."""
    ws_ping_interval: float = Field(default=20.0, gt=0)
    """Seconds between keepalive pings; a peer that does not answer within
    ``ws_ping_timeout`` is disconnected (half-open connections are reaped)."""
    ws_ping_timeout: float = Field(default=20.0, gt=0)
    drain_seconds: float = Field(default=10.0, ge=0)
    """On SIGTERM: how long in-flight requests may take before they are cancelled."""
    # -- issue 11, hostile websocket clients: per user and process unless said otherwise --
    ws_connect_rate: float = Field(default=1.0, gt=0)
    """Websocket connects per second one user may open (token bucket of ``ws_connect_burst``);
    over it the handshake is refused with HTTP 429 and ``Retry-After``."""
    ws_connect_burst: int = Field(default=10, ge=1)
    ws_replay_budget: int = Field(default=32 * 1024 * 1024, ge=1)
    """Bytes of replay and catch-up frames one user may be sent per ``ws_replay_interval``
    (a bucket that refills continuously). A connect while over it is refused like one over
    the connect rate; a replay that is let in is sent whole, however much it costs."""
    ws_replay_interval: float = Field(default=60.0, gt=0)
    ws_ping_rate: float = Field(default=2.0, gt=0)
    """Application ``ping`` frames per second one connection gets a ``pong`` for (bursts of
    five times this); the rest are dropped unanswered."""
    ws_connect_timeout: float = Field(default=5.0, gt=0)
    """Seconds a new websocket may wait to join its room's live stream and read its replay
    from the database; past it (a database outage) it is closed with 1013."""
    limiter_max_users: int = Field(default=100_000, ge=1)
    """Entries in each per-user limiter map; past it, new users are refused until idle ones
    are forgotten."""
    # -- end of issue 11, hostile websocket clients --
    embedded: bool = False
    """Set by the CLI once it has started the embedded PostgreSQL; not meant to be set by hand."""

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.database_url is None:
            return self  # embedded mode: the CLI fills in URL and secret before serving
        if self.jwt_secret is None and not self.jwt_public_key:
            raise ValueError(
                "CHAT_JWT_SECRET (HS256) or CHAT_JWT_PUBLIC_KEY (RS256/ES256) is required "
                "when CHAT_DATABASE_URL is set"
            )
        if self.jwt_secret is not None:
            secret = self.jwt_secret.get_secret_value()
            if secret.lower() in _KNOWN_WEAK_SECRETS or len(secret.encode()) < _MIN_SECRET_BYTES:
                raise ValueError(
                    f"CHAT_JWT_SECRET must be at least {_MIN_SECRET_BYTES} bytes of randomness "
                    "(try: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
                )
        if self.broadcast_url is not None and not self.broadcast_over_redis:
            to_asyncpg_dsn(self.broadcast_url)  # refuses any other scheme with a clear error
        if self.dev_auth and self.jwt_secret is None:
            raise ValueError("CHAT_DEV_AUTH needs CHAT_JWT_SECRET to sign its tokens")
        return self

    @property
    def dev_auth_enabled(self) -> bool:
        """Dev logins default to on only for the embedded, single-machine mode."""
        return self.embedded if self.dev_auth is None else self.dev_auth

    @property
    def origins(self) -> frozenset[str]:
        parts = (o.strip().rstrip("/") for o in self.allowed_origins.split(","))
        return frozenset(o for o in parts if o)

    @property
    def sqlalchemy_url(self) -> str:
        return to_sqlalchemy_url(self.require_database_url())

    @property
    def broadcast_over_redis(self) -> bool:
        return self.broadcast_url is not None and self.broadcast_url.startswith(
            ("redis://", "rediss://")
        )

    @property
    def listen_dsn(self) -> str:
        """The asyncpg DSN the LISTEN connection uses (the broadcast URL, else the database)."""
        return to_asyncpg_dsn(self.broadcast_url or self.require_database_url())

    @property
    def notify_in_transaction(self) -> bool:
        """NOTIFY inside the insert transaction works only when listeners use the same server."""
        if self.broadcast_url is None:
            return True
        if self.broadcast_over_redis:
            return False
        return to_asyncpg_dsn(self.broadcast_url) == to_asyncpg_dsn(self.require_database_url())

    def require_database_url(self) -> str:
        if self.database_url is None:
            raise RuntimeError("no database URL: start the embedded server first")
        return self.database_url


def to_sqlalchemy_url(url: str) -> str:
    """``postgres://`` / ``postgresql://`` -> ``postgresql+asyncpg://``."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        return urlunsplit(parts._replace(scheme="postgresql+asyncpg"))
    raise ValueError(f"unsupported database URL scheme {parts.scheme!r}: use postgresql://")


def to_asyncpg_dsn(url: str) -> str:
    """``postgresql+asyncpg://`` -> ``postgresql://`` (what asyncpg itself accepts)."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        return urlunsplit(parts._replace(scheme="postgresql"))
    raise ValueError(
        f"unsupported broadcast URL scheme {parts.scheme!r}: use postgresql:// or redis://"
    )
