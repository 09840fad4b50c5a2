"""``chat-service serve | migrate | token``.

A start-up failure is one log line in the configured format (JSON lines, or plain text with
``--dev`` and in embedded mode) and an exit code from ``service.errors``: 2 for invalid
settings, 3 for an unreachable database, 4 for a schema this release cannot run against (behind
its head, or migrated past what it accepts: docs/operations.md, "Upgrading"), 1 for anything
else (a bug: its traceback is in the line's ``exc``).
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import re
import signal
from typing import Any

from pydantic import ValidationError

from service.config import Settings
from service.errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_INVALID_SETTINGS,
    DatabaseUnreachable,
    InvalidSettings,
    StartupError,
)
from service.observability import ClientNoise, JsonFormatter, RequestIdFilter

log = logging.getLogger("chat-service")

TOKEN_IN_TEXT = re.compile(
    r"((?:t|%74)(?:o|%6f)(?:k|%6b)(?:e|%65)(?:n|%6e)(?:=|%3d))[^&\s\"']+", re.IGNORECASE
)
"""``token=`` however it is spelt: the server decodes ``%74oken`` to ``token`` too."""


class RedactTokens(logging.Filter):
    """uvicorn logs request lines with their query string: never let a ``?token=`` through."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "=" in message or "%3d" in message.lower():
            redacted = TOKEN_IN_TEXT.sub(r"\1[redacted]", message)
            if redacted != message:
                record.msg = redacted
                record.args = None
        return True


def logging_config(level: str, *, dev: bool = False) -> dict[str, Any]:
    """One stderr handler with token redaction: JSON lines, or plain text with ``--dev``.
    uvicorn applies it in every worker process."""
    quiet = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "redact": {"()": RedactTokens},
            "request_id": {"()": RequestIdFilter},
            "client_noise": {"()": ClientNoise},
        },
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"},
            "json": {"()": JsonFormatter},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "filters": ["redact", "request_id"],
                "formatter": "plain" if dev else "json",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": quiet,
            "uvicorn.error": {**quiet, "filters": ["client_noise"]},
            "uvicorn.access": quiet,
            "alembic.runtime.plugins": {"level": "WARNING"},
        },
    }


def ws_max_size(settings: Settings) -> int:
    """Room for the longest body even if every character arrives as a 12-byte JSON escape."""
    return max(64 * 1024, settings.max_message_chars * 12 + 4096)


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _embedded_requested() -> bool:
    """Whether settings would select embedded mode (no database URL), known before they are
    validated: an invalid setting is then reported in embedded mode's plain format."""
    return not any(k.upper() == "CHAT_DATABASE_URL" for k in os.environ)


def _settings(**update: object) -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise InvalidSettings(f"invalid settings: {problems}") from None
    return settings.model_copy(update=update) if update else settings


def serve(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415 - keep `token` fast

    from service.app import check_database_once, create_app  # noqa: PLC0415
    from service.embedded_mode import export, resolved_settings  # noqa: PLC0415
    from service.fastpath import choose  # noqa: PLC0415

    # The listen address decides what is open by default (dev logins, metrics, docs).
    with resolved_settings(_settings(listen_host=args.host)) as settings:
        # JSON lines for production; plain text with --dev and in the embedded (try-it) mode.
        log_config = logging_config(args.log_level, dev=args.dev or settings.embedded)
        logging.config.dictConfig(log_config)
        if settings.embedded:
            _migrate(settings.require_database_url())
        check_database_once(settings)
        host = "localhost" if args.host in ("0.0.0.0", "::") else args.host  # noqa: S104
        protocols = choose(settings.fast_path)
        log.info("demo page at http://%s:%d/", host, args.port)
        options = {
            "host": args.host,
            "port": args.port,
            "log_config": log_config,
            "http": protocols.http,
            "ws": protocols.ws,
            "ws_max_size": ws_max_size(settings),
            "proxy_headers": True,
            "timeout_graceful_shutdown": settings.drain_seconds,
            "ws_ping_interval": settings.ws_ping_interval,
            "ws_ping_timeout": settings.ws_ping_timeout,
        }
        # uvicorn drains, restores this handler and re-raises SIGTERM: exit 0 through the
        # finally blocks (which stop the embedded PostgreSQL) instead of dying by the signal.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        if args.workers > 1:
            export(settings)
            uvicorn.run("service.app:create_app", factory=True, workers=args.workers, **options)
        else:
            uvicorn.run(create_app(settings), **options)
    return 0


def _migrate(url: str) -> None:
    """``alembic upgrade head``; a database it cannot reach is a start-up failure, not a bug."""
    from sqlalchemy.exc import DBAPIError  # noqa: PLC0415

    from service.db.migrate import upgrade  # noqa: PLC0415

    try:
        upgrade(url)
    except (OSError, TimeoutError, DBAPIError) as exc:
        from sqlalchemy.engine import make_url  # noqa: PLC0415

        where = make_url(url).render_as_string(hide_password=True)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DatabaseUnreachable(f"cannot migrate the database at {where}: {reason}") from None


def migrate(_args: argparse.Namespace) -> int:
    from service.embedded_mode import resolved_settings  # noqa: PLC0415

    with resolved_settings(_settings()) as settings:
        _migrate(settings.require_database_url())
    log.info("database schema is at head")
    return 0


def token(args: argparse.Namespace) -> int:
    """Sign with the configured secret, or the one a local embedded ``serve`` keeps; never make
    one up: a new secret would sign tokens that no running service accepts."""
    from service.auth import TokenCodec  # noqa: PLC0415
    from service.embedded_mode import local_secret_path, with_existing_secret  # noqa: PLC0415

    settings = with_existing_secret(_settings())
    if settings.jwt_secret is None and not settings.jwt_public_key:
        path = local_secret_path(settings)
        raise InvalidSettings(
            f"no signing secret: CHAT_JWT_SECRET is not set and {path} does not exist "
            "(set CHAT_JWT_SECRET, or CHAT_DATA_DIR to the data folder of the running service)"
        )
    codec = TokenCodec(settings)
    if not codec.can_issue:
        raise InvalidSettings("issuing tokens needs CHAT_JWT_SECRET (a public key only verifies)")
    print(codec.issue(args.user, ttl=args.ttl, name=args.name, admin=args.admin))
    return 0


def chat(args: argparse.Namespace) -> int:
    from service.client.terminal import run  # noqa: PLC0415 - keep `token` fast

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-service", description=__doc__)
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="run the HTTP and websocket server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="processes (they share the database)")
    p.add_argument("--dev", action="store_true", help="human-readable logs instead of JSON lines")
    p.set_defaults(func=serve)

    p = commands.add_parser("migrate", help="upgrade the database schema to the latest version")
    p.set_defaults(func=migrate)

    p = commands.add_parser("token", help="print a signed token for USER")
    p.add_argument("user")
    p.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    p.add_argument("--name", default=None, help="display name claim")
    p.add_argument(
        "--admin",
        action="store_true",
        help="a service admin's token (CHAT_ADMIN_CLAIM names CHAT_ADMIN_ROLE): manages every room",
    )
    p.set_defaults(func=token)

    p = commands.add_parser("chat", help="chat in ROOM from the terminal (docs/client.md)")
    p.add_argument("room")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    p.add_argument("--token", default=None, help="else a dev token for --user from the server")
    p.add_argument("--user", default=None, help="who to ask a dev token for (else: $USER)")
    p.add_argument("--history", type=int, default=20, help="messages shown first")
    p.set_defaults(func=chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # serve logs JSON unless --dev or embedded; the one-shot commands talk to a person.
    plain = getattr(args, "dev", True) or _embedded_requested()
    logging.config.dictConfig(logging_config(args.log_level, dev=plain))
    try:
        return int(args.func(args))
    except StartupError as exc:
        # One line; a multi-line message (the embedded PostgreSQL's log tail) says in its first
        # line where the rest is, and the rest is logged at debug level.
        first, _, rest = str(exc).partition("\n")
        log.error("%s", first)
        if rest:
            log.debug("%s", rest)
        return exc.exit_code
    except ValidationError as exc:  # settings built after start-up checks (a bug, but clear)
        log.error("invalid settings: %s", exc)
        return EXIT_INVALID_SETTINGS
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:
        log.exception("chat-service failed to start")
        return EXIT_ERROR
