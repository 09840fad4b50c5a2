"""Settings: the one typed object read from the environment (prefix ``CHAT_``).

Nothing here runs at import time. ``Settings()`` is built by the CLI or ``create_app`` and passed
down; no module keeps a global copy. With no ``CHAT_DATABASE_URL`` the service is in *embedded
mode*: the CLI starts a private PostgreSQL in ``CHAT_DATA_DIR`` and fills in the database URL and a
generated JWT secret (see ``service.embedded_mode``). Outside embedded mode unsafe defaults are
refused instead of silently accepted: a secret must look random (``weak_secret_problem``), and
dev logins, metrics and the API docs are open by default only on a loopback listener
(``listen_host``, which the CLI sets from ``serve --host``).
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOM_NAME_PATTERN = r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
ROOM_NAME_MAX = 64
"""Room names and dev-login user names: safe in URLs, logs and channel names. 1 to
``ROOM_NAME_MAX`` of ``A-Z a-z 0-9 _ . -``, not only dots: URL normalisation (RFC 3986) removes
``.`` and ``..`` segments from paths, so a REST client could never reach such a room. (The
length is a separate ``max_length``: pydantic's regex engine has no look-ahead.)"""

_MIN_SECRET_BYTES = 32
_MIN_SECRET_BITS = 80
"""Estimated from character frequencies; ``openssl rand -hex 16`` (128 real bits) scores ~96."""
_KNOWN_WEAK_SECRETS = {"changeme", "changethis", "secret", "password", "test", "dev"}
_SHIPPED_EXAMPLES = {
    # what .env.example shipped before it left the secrets empty: copies of it are everywhere
    "change-me-to-48-random-url-safe-characters-xxxxxxxxxxxx",
    "change-me-to-a-long-random-password",
}
_PLACEHOLDER_MARKERS = (
    "changeme",
    "change-me",
    "change_me",
    "changethis",
    "change-this",
    "replaceme",
    "replace-me",
    "placeholder",
    "example",
    "your-secret",
    "yoursecret",
)
GENERATE_SECRET_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(48))'"  # noqa: S105


def weak_secret_problem(secret: str) -> str | None:
    """Why ``secret`` cannot be a signing key, or ``None``. Length alone is not enough: 32
    copies of one character, a shipped placeholder or ``abcabc...`` are as good as public."""
    lowered = secret.lower()
    if lowered in _KNOWN_WEAK_SECRETS or secret in _SHIPPED_EXAMPLES:
        return "a well-known value"
    if len(secret.encode()) < _MIN_SECRET_BYTES:
        return f"shorter than {_MIN_SECRET_BYTES} bytes"
    if any(marker in lowered for marker in _PLACEHOLDER_MARKERS):
        return "a placeholder"
    counts = Counter(secret)
    bits = max(0.0, -sum(n * math.log2(n / len(secret)) for n in counts.values()))
    if bits < _MIN_SECRET_BITS or counts.most_common(1)[0][1] * 2 > len(secret):
        return f"too predictable (its characters carry about {bits:.0f} bits of randomness)"
    if secret in (secret + secret)[1:-1]:
        return "a repeated pattern"
    steps = [ord(b) - ord(a) for a, b in zip(secret, secret[1:], strict=False)]
    regular = sum(1 for d, e in zip(steps, steps[1:], strict=False) if d == e)
    if regular * 2 > len(steps) or any(c * 8 in secret for c in counts):
        return "a run or sequence of characters"
    return None


def is_loopback(host: str | None) -> bool:
    """Whether a listen address only accepts connections from this machine:
    ``localhost``, ``127.0.0.0/8`` and ``::1``; not ``0.0.0.0`` or ``::``."""
    if host is None:
        return False
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    fast_path: Literal["auto", "off"] = "auto"
    """``auto``: uvicorn protocols tuned for this service where the installed uvicorn's
    internals are the ones they were written for, else uvicorn's own (``service.fastpath``);
    ``off``: always uvicorn's own."""
    # --- Issue 11, HTTP-level protections (service/http_guard.py) ---
    max_body_bytes: int | None = Field(default=None, ge=1024)
    """Largest request body; default: room for the longest message in the worst JSON escaping
    (``body_limit``). Larger bodies are refused with 413 before they are read."""
    header_timeout: float = Field(default=10.0, gt=0)
    """Seconds a connection may take to send its request head (and have its websocket
    handshake answered) before it is closed."""
    max_unfinished_connections: int = Field(default=512, ge=1)
    """Connections that may be waiting for their request head at once; beyond it the oldest is
    closed."""
    fd_reserve: int = Field(default=64, ge=0)
    """File descriptors kept free under RLIMIT_NOFILE for the database, LISTEN and files: a new
    connection that would use one of them is closed at once."""
    # -- issue 11, hostile websocket clients: per user and process unless said otherwise --
    ws_connect_rate: float = Field(default=1.0, gt=0)
    """Websocket connects per second one user may open (token bucket of ``ws_connect_burst``);
    over it the handshake is refused with HTTP 429 and ``Retry-After``."""
    ws_connect_burst: int = Field(default=10, ge=1)
    ws_replay_budget: int = Field(default=32 * 1024 * 1024, ge=1)
    """Bytes of connect-time replay frames one user may be sent per ``ws_replay_interval``
    (a bucket that refills continuously). A connect while over it is refused like one over
    the connect rate; a replay that is let in is sent whole, however much it costs."""
    ws_replay_interval: float = Field(default=60.0, gt=0)
    ws_ping_rate: float = Field(default=2.0, gt=0)
    """Application ``ping`` frames per second one connection gets a ``pong`` for (bursts of
    five times this); the rest are dropped unanswered."""
    ws_auth_rate: float = Field(default=0.1, gt=0)
    """``auth`` frames (token renewals) per second one connection may send, in bursts of
    three (``service.realtime.websocket.AUTH_BURST``); over it they are refused with
    ``rate_limited`` before their token is looked at: signature checks cannot be had in bulk."""
    ws_connect_timeout: float = Field(default=5.0, gt=0)
    """Seconds a new websocket may wait to join its room's live stream and read its replay
    from the database; past it (a database outage) it is closed with 1013."""
    limiter_max_users: int = Field(default=100_000, ge=1)
    """Entries in each per-user limiter map; past it, new users are refused until idle ones
    are forgotten."""
    # -- end of issue 11, hostile websocket clients --
    # -- issue 12, part 1: a partition that sends no reset (every database call has a deadline) --
    db_timeout: float = Field(default=5.0, gt=0, le=300)
    """Seconds for opening a database connection and for each read statement (history,
    replay, catch-up) before the database counts as unavailable and the connection is
    dropped."""
    listen_timeout: float = Field(default=3.0, gt=0, le=300)
    """Deadline of each command on the LISTEN connection (LISTEN, UNLISTEN, the watchdog's
    probe) and of a publish. A command unanswered after half of it makes ``/readyz`` and
    ``chat_listen_up`` report the connection down; at the deadline it is replaced."""
    listen_probe_interval: float = Field(default=2.0, gt=0, le=300)
    """Seconds between the watchdog's probes (``SELECT 1``) of an idle LISTEN connection."""
    tcp_keepalive_idle: int = Field(default=10, ge=1, le=32_767)
    """Seconds a database connection may be silent before TCP keepalive probes start."""
    tcp_keepalive_interval: int = Field(default=5, ge=1, le=32_767)
    """Seconds between unanswered keepalive probes."""
    tcp_keepalive_count: int = Field(default=3, ge=1, le=127)
    """Unanswered keepalive probes after which the kernel drops the connection."""
    tcp_user_timeout: float = Field(default=30.0, ge=0, le=3600)
    """Seconds sent data may stay unacknowledged before the kernel drops the connection
    (Linux ``TCP_USER_TIMEOUT``; 0 leaves the kernel's ~15 minutes)."""
    # -- end of issue 12, part 1 --
    # -- issue 12, catch-up without storms (service/realtime/hub.py, RoomHub.catch_up) --
    catch_up_limit: int = Field(default=1000, ge=1, le=100_000)
    """Newest messages one shared catch-up read holds (after a LISTEN reconnect or a hole in
    the live stream); a connection further behind is closed with 1013 and resumes with
    ``since``."""
    catch_up_max_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """Bytes of message JSON one shared catch-up read holds (the newest message always)."""
    # -- end of issue 12, catch-up without storms --
    # -- issue 12, the Redis bus (service/realtime/redis_backend.py) --
    redis_timeout: float = Field(default=2.0, gt=0, le=60)
    """With ``CHAT_BROADCAST_URL=redis://``: seconds a Redis connect, subscribe, publish batch
    or PING may take before the bus counts as down (it is then reconnected with backoff)."""
    redis_health_interval: float = Field(default=5.0, gt=0, le=3600)
    """Seconds of silence on the Redis subscriber connection before it is PINGed."""
    # -- end of issue 12, the Redis bus --
    # -- issue 12, unknown outcomes and the bounded writer queue (service/db/writer.py) --
    send_deadline: float = Field(default=5.0, gt=0, le=300)
    """Seconds within which a send is answered: the writer's connect, batch call and commit
    all count against it. Past it the send gets ``unavailable`` (never sent) or
    ``outcome_unknown`` (sent, commit not confirmed) and the writer reconnects."""
    writer_queue_limit: int = Field(default=2000, ge=1)
    """Sends queued for the writer and not yet in a batch; past it new sends get
    ``overloaded`` (with ``retry_after``; REST: 503 with Retry-After) instead of queueing."""
    # -- end of issue 12, unknown outcomes --
    # -- issue 15, read state (service/chat/reads.py) --
    read_flush_interval: float = Field(default=0.25, gt=0, le=10)
    """Seconds a process gathers ``read`` frames before it moves the cursors in one statement
    (and sends their signals): a client's other devices see the move about this much later."""
    receipts_max_members: int = Field(default=50, ge=0, le=10_000)
    """Rooms of at most this many members get ``receipt`` frames (one per user per second at
    most); 0 turns receipts off."""
    # -- end of issue 15, read state --
    # -- issue 16, presence and typing (service/chat/presence.py, service/chat/typing.py) --
    presence_interval: float = Field(default=1.0, gt=0, le=60)
    """Seconds between two ``presence`` frames of a room on a socket: changes meanwhile go
    out together, so a thousand users reconnecting after a deploy is a few frames."""
    presence_grace: float = Field(default=5.0, ge=0, le=300)
    """Seconds a user whose last socket closed stays present: a reconnect within it (a
    replica drained with 1012, a network blip) is never reported offline."""
    presence_timeout: float = Field(default=30.0, ge=0.5, le=3600)
    """Seconds within which the users of a replica that died (kill -9, partitioned away) are
    reported offline by the others. Heartbeats go out every sixth of it."""
    presence_ready_limit: int = Field(default=100, ge=0, le=1000)
    """Users listed in ``ready``'s ``presence`` (the rest are paged over REST)."""
    typing_timeout: float = Field(default=6.0, gt=0, le=60)
    """Seconds a user stays "typing" after their last ``typing`` frame (clients send one
    every 2-3 s while the user types); their next message ends it at once."""
    # -- end of issue 16, presence and typing --
    embedded: bool = False
    """Set by the CLI once it has started the embedded PostgreSQL; not meant to be set by hand."""

    # -- issue 11, safe defaults: what is open to whom ------------------------------------------
    listen_host: str | None = None
    """Set by the CLI from ``serve --host`` (and passed to worker processes); unknown means not
    loopback. Dev logins, metrics and the API docs default to on only on a loopback listener."""
    public_docs: bool | None = None
    """``/docs``, ``/redoc`` and ``/openapi.json``: unset means only on a loopback listener."""
    metrics_token: SecretStr | None = None
    """When set, ``/metrics`` needs ``Authorization: Bearer <it>``; unset, ``/metrics`` answers
    only on a loopback listener (404 elsewhere)."""

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``CHAT_METRICS_TOKEN=`` (what compose passes when .env leaves it empty) is no token."""
        return None if value == "" else value

    # Tokens from an identity provider (issue 11, part 2). The claims settings describe the
    # provider's tokens (verified with CHAT_JWKS_URL or CHAT_JWT_PUBLIC_KEY); tokens signed
    # with CHAT_JWT_SECRET are the service's own (``sub``, ``name``) and are not subject to them.
    jwks_url: str | None = None
    """The provider's JWKS (``https://idp.example.com/.well-known/jwks.json``)."""
    jwt_audience: str | None = None
    """Comma-separated; when set, a provider token's ``aud`` must name one of them."""
    jwt_issuer: str | None = None
    """When set, a provider token's ``iss`` must be exactly this."""
    jwt_user_claim: str = Field(default="sub", min_length=1, max_length=100)
    """The claim of a provider token that holds the user id (the author of messages)."""
    jwt_name_claim: str = Field(default="name", max_length=100)
    """The claim holding a display name; empty for none."""
    admin_claim: str = Field(default="roles", min_length=1, max_length=100)
    """The claim naming a token's roles (a list, or a space-separated string); a token whose
    roles include ``admin_role`` is a service admin's (any room, every action)."""
    admin_role: str = Field(default="chat:admin", min_length=1, max_length=200)
    jwks_min_refetch_seconds: float = Field(default=30.0, ge=0.1, le=86_400)
    """A token with an unknown ``kid`` refetches the JWKS at most this often."""
    jwks_max_age_seconds: float = Field(default=600.0, ge=1, le=86_400)
    """Cached keys are refetched in the background once this old (a removed key stops)."""
    jwks_timeout: float = Field(default=5.0, gt=0, le=60)
    """Deadline of one JWKS fetch, connection to last byte."""

    # Outgoing webhooks (issue 17, part 3; docs/webhooks.md): every stream item POSTed, signed.
    webhook_url: str | None = None
    """Where every room's stream items are POSTed (``http(s)://``); rooms may have their own
    receiver too (``PUT /rooms/{room}/webhook``)."""
    webhook_secret: SecretStr | None = None
    """The HMAC-SHA256 key of ``X-Chat-Signature``: required (32+ random bytes) with a URL, and
    for per-room registrations."""
    webhook_max_attempts: int = Field(default=12, ge=1, le=1000)
    """Attempts per item before it becomes a dead letter (and the room's next item goes)."""
    webhook_timeout: float = Field(default=10.0, gt=0, le=300)
    """Deadline of one POST, connect to status line; past it the attempt failed."""
    webhook_backoff: float = Field(default=1.0, gt=0, le=3600)
    """Seconds before the first retry; each next one waits twice as long (with jitter)."""
    webhook_backoff_max: float = Field(default=300.0, gt=0, le=86_400)
    """The longest wait between two attempts."""
    webhook_concurrency: int = Field(default=4, ge=1, le=64)
    """POSTs one replica has in flight at most (one per room at a time); each holds one of
    the deliverer's own database connections, apart from the service's pool."""
    webhook_poll_interval: float = Field(default=5.0, gt=0, le=300)
    """Deliverers wake on NOTIFY; this is the fallback poll when a NOTIFY was missed."""

    @field_validator("webhook_url", "webhook_secret", mode="before")
    @classmethod
    def _empty_webhook_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_webhooks(self) -> Settings:
        """A webhook that could not be delivered or verified is refused at start-up."""
        if self.webhook_url is not None:
            problem = http_url_problem(self.webhook_url)
            if problem:
                raise ValueError(f"CHAT_WEBHOOK_URL must be a URL to POST to: {problem}")
            if self.webhook_secret is None:
                raise ValueError(
                    f"CHAT_WEBHOOK_URL needs CHAT_WEBHOOK_SECRET to sign with (try: "
                    f"{GENERATE_SECRET_HINT})"
                )
        if self.webhook_secret is not None:
            problem = weak_secret_problem(self.webhook_secret.get_secret_value())
            if problem:
                raise ValueError(
                    f"CHAT_WEBHOOK_SECRET is {problem}: it must be at least {_MIN_SECRET_BYTES} "
                    f"bytes of randomness (try: {GENERATE_SECRET_HINT})"
                )
        if self.webhook_backoff_max < self.webhook_backoff:
            raise ValueError("CHAT_WEBHOOK_BACKOFF_MAX must be at least CHAT_WEBHOOK_BACKOFF")
        return self

    @property
    def webhooks_enabled(self) -> bool:
        """A secret to sign with: the global URL, rooms' registrations, or both, are served."""
        return self.webhook_secret is not None

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.metrics_token is not None:
            problem = weak_secret_problem(self.metrics_token.get_secret_value())
            if problem:
                raise ValueError(f"CHAT_METRICS_TOKEN is {problem}: try {GENERATE_SECRET_HINT}")
        if self.jwt_secret is not None:
            problem = weak_secret_problem(self.jwt_secret.get_secret_value())
            if problem:
                raise ValueError(
                    f"CHAT_JWT_SECRET is {problem}: it must be at least {_MIN_SECRET_BYTES} "
                    f"bytes of randomness (try: {GENERATE_SECRET_HINT})"
                )
        if self.database_url is None:
            return self  # embedded mode: the CLI fills in URL and secret before serving
        password = urlsplit(self.database_url).password
        if password is not None and (
            password in _SHIPPED_EXAMPLES
            or any(marker in password.lower() for marker in _PLACEHOLDER_MARKERS)
        ):
            raise ValueError(
                "the password in CHAT_DATABASE_URL is the example's placeholder: set a real one"
            )
        if self.jwt_secret is None and not self.jwt_public_key and not self.jwks_url:
            raise ValueError(
                "CHAT_JWT_SECRET (HS256), CHAT_JWT_PUBLIC_KEY or CHAT_JWKS_URL is required "
                "when CHAT_DATABASE_URL is set"
            )
        if self.broadcast_url is not None and not self.broadcast_over_redis:
            to_asyncpg_dsn(self.broadcast_url)  # refuses any other scheme with a clear error
        if self.dev_auth and self.jwt_secret is None:
            raise ValueError("CHAT_DEV_AUTH needs CHAT_JWT_SECRET to sign its tokens")
        return self

    @model_validator(mode="after")
    def _check_identity_provider(self) -> Settings:
        """Bad identity-provider settings are refused at start-up, not on the first token."""
        if self.jwks_url is not None:
            problem = http_url_problem(self.jwks_url)
            if problem:
                raise ValueError(f"CHAT_JWKS_URL must be a URL to fetch keys from: {problem}")
        if self.jwt_public_key:
            from service.idp import load_public_key  # noqa: PLC0415 - idp imports cryptography

            load_public_key(self.jwt_public_key)  # ValueError says what is wrong
        provider_only = {
            "CHAT_JWT_AUDIENCE": bool(self.jwt_audience),
            "CHAT_JWT_ISSUER": bool(self.jwt_issuer),
            "CHAT_JWT_USER_CLAIM": self.jwt_user_claim != "sub",
            "CHAT_JWT_NAME_CLAIM": self.jwt_name_claim != "name",
        }
        given = [name for name, is_set in provider_only.items() if is_set]
        if given and not (self.jwks_url or self.jwt_public_key):
            raise ValueError(
                f"{', '.join(given)} describe identity-provider tokens: set CHAT_JWKS_URL or "
                "CHAT_JWT_PUBLIC_KEY too (tokens signed with CHAT_JWT_SECRET always use sub/name)"
            )
        return self

    @property
    def listens_on_loopback(self) -> bool:
        return is_loopback(self.listen_host)

    @property
    def dev_auth_enabled(self) -> bool:
        """Dev logins default to on only for the embedded mode on a loopback listener: anyone
        who reaches ``/auth/dev-token`` can sign in as anyone."""
        if self.dev_auth is not None:
            return self.dev_auth
        return self.embedded and self.listens_on_loopback

    @property
    def docs_enabled(self) -> bool:
        return self.listens_on_loopback if self.public_docs is None else self.public_docs

    @property
    def body_limit(self) -> int:
        """``max_body_bytes``, or room for the longest message even if every character arrives
        as a 12-byte JSON escape (the websocket frame limit uses the same rule)."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return max(64 * 1024, self.max_message_chars * 12 + 4096)

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


MAX_URL_CHARS = 2000


def http_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an endpoint this service calls (a webhook receiver, a JWKS), as a
    sentence, or None: one check for the settings and the admin routes."""
    if len(url) > MAX_URL_CHARS:
        return f"the URL must be at most {MAX_URL_CHARS} characters"
    if not url.isprintable() or any(c.isspace() for c in url):
        return "the URL must hold no spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError as exc:
        return f"not a URL ({str(exc).lower()})"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "the URL must be an absolute https:// (or http://) URL"
    return None


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
