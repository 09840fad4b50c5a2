"""The app factory. The lifespan is the one place where connections are made and closed."""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
from broadcaster import Broadcast
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import auth as auth_routes
from service.api import manage as manage_routes
from service.api import rooms as room_routes
from service.api import webhooks as webhook_routes
from service.auth import TokenCodec
from service.chat.envelope import PRESENCE_SIGNAL, TYPING_SIGNAL, TYPING_STOP
from service.chat.limits import UserLimits
from service.chat.presence import Presence
from service.chat.reads import ReadCursors
from service.chat.typing import Typing
from service.chat.webhooks import WebhookDeliverer
from service.config import Settings, to_asyncpg_dsn
from service.db.engine import Keepalive, create_engine, create_pool, session_settings
from service.db.migrate import ReleaseSchema
from service.db.writer import MessageWriter
from service.errors import (
    ChatError,
    DatabaseUnreachable,
    InternalError,
    NotAuthenticated,
    SchemaMismatch,
    StartupError,
)
from service.http_guard import (
    GUARD_STATE_KEY,
    ConnectionGuard,
    GuardMiddleware,
    security_headers,
)
from service.metrics import Metrics
from service.observability import RequestIdMiddleware, request_id
from service.realtime import websocket as websocket_routes
from service.realtime.backend import ListenBackend

if TYPE_CHECKING:
    from service.realtime.redis_backend import RedisPubSubBackend
from service.realtime.hub import CatchUpLimits, RoomHub
from service.services import Services

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


async def check_database(engine: AsyncEngine, schema: ReleaseSchema) -> None:
    url = engine.url.render_as_string(hide_password=True)
    try:
        async with engine.connect() as conn:
            problem = await asyncio.wait_for(schema.problem(conn), 10)
    except (OSError, TimeoutError, DBAPIError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DatabaseUnreachable(f"cannot reach the database at {url}: {reason}") from None
    if problem is not None:
        raise SchemaMismatch(problem)


async def database_check(engine: AsyncEngine, schema: ReleaseSchema) -> str | None:
    """``None`` when the database is ready, else why not (for the log: it names the host)."""
    try:
        await asyncio.wait_for(check_database(engine, schema), 3)
    except (StartupError, TimeoutError) as exc:
        return str(exc) or "database check timed out"
    return None


def check_database_once(settings: Settings) -> None:
    """The lifespan's database check, run by the CLI before the server starts, so that a
    failure is one log line and an exit code rather than a server's traceback."""

    async def check() -> None:
        engine = create_engine(settings)
        try:
            await check_database(engine, ReleaseSchema.shipped())
        finally:
            await engine.dispose()

    asyncio.run(check())


def make_backend(
    settings: Settings, pool: asyncpg.Pool | None = None
) -> ListenBackend | RedisPubSubBackend:
    """PostgreSQL LISTEN by default; Redis pub/sub for a ``redis://`` broadcast URL. A LISTEN
    connection to the database that stops answering retires ``pool``'s connections too: they
    crossed the same network path, and the catch-up that follows must not wait on a dead one."""
    if settings.broadcast_url is not None and settings.broadcast_over_redis:
        from service.realtime.redis_backend import RedisPubSubBackend  # noqa: PLC0415

        return RedisPubSubBackend(
            settings.broadcast_url,
            timeout=settings.redis_timeout,
            health_interval=settings.redis_health_interval,
        )
    return ListenBackend(
        settings.listen_dsn,
        probe_interval=settings.listen_probe_interval,
        timeout=settings.listen_timeout,
        connect_timeout=settings.db_timeout,
        keepalive=Keepalive.from_settings(settings),
        on_silence=(  # same server: the pool's connections cross the same network path
            pool.expire_connections if pool is not None and settings.notify_in_transaction else None
        ),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; with no argument, settings come from the environment (uvicorn --factory)."""
    settings = settings or Settings()
    settings.require_database_url()
    tokens = TokenCodec(settings)
    metrics = Metrics()
    schema = ReleaseSchema.shipped()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, object]]:
        async with AsyncExitStack() as stack:
            tokens.start()  # the identity provider's JWKS, fetched in the background
            stack.push_async_callback(tokens.close)
            engine = create_engine(settings)
            stack.push_async_callback(engine.dispose)
            await check_database(engine, schema)
            pool = await create_pool(settings)
            stack.push_async_callback(pool.close)
            writer = MessageWriter(
                to_asyncpg_dsn(settings.require_database_url()),
                notify=settings.notify_in_transaction,
                deadline=settings.send_deadline,
                queue_limit=settings.writer_queue_limit,
                keepalive=Keepalive.from_settings(settings),
                on_batch=metrics.commit_batch.observe,
                session_settings=session_settings(settings),
            )
            await writer.start()
            stack.push_async_callback(writer.close)
            backend = make_backend(settings, pool)
            broadcast = Broadcast(backend=backend)
            await stack.enter_async_context(broadcast)
            hub = RoomHub(
                broadcast,
                pool,
                settings.outbox_limit,
                on_forward=lambda sent_at: metrics.fanout_latency.observe(
                    max(0.0, time.time() - sent_at)
                ),
                catch_up_limits=CatchUpLimits(settings.catch_up_limit, settings.catch_up_max_bytes),
                on_catch_up_read=metrics.catch_up_reads.inc,
            )
            metrics.watch(
                pool_checked_out=lambda: pool.get_size() - pool.get_idle_size(),
                pool_size=pool.get_size,
                listen_reconnects=lambda: backend.reconnects,
                listen_up=lambda: backend.connected,
            )
            stack.push_async_callback(hub.close)
            if settings.webhook_secret is not None:
                # Its own tasks and connections: a slow receiver never holds up the chat.
                deliverer = WebhookDeliverer(
                    to_asyncpg_dsn(settings.require_database_url()),
                    url=settings.webhook_url,
                    secret=settings.webhook_secret.get_secret_value().encode(),
                    on_outcome=metrics.webhook_outcome,
                    on_backlog=metrics.webhook_backlog_read,
                    max_attempts=settings.webhook_max_attempts,
                    timeout=settings.webhook_timeout,
                    backoff_base=settings.webhook_backoff,
                    backoff_max=settings.webhook_backoff_max,
                    concurrency=settings.webhook_concurrency,
                    poll_interval=settings.webhook_poll_interval,
                    # The trigger NOTIFYs this database: heard on the bus's LISTEN connection
                    # when the bus is this database.
                    follow=hub.follow if settings.notify_in_transaction else None,
                    keepalive=Keepalive.from_settings(settings),
                )
                await deliverer.start()
                stack.push_async_callback(deliverer.close)
            publish = None if settings.notify_in_transaction else broadcast.publish
            reads = ReadCursors(
                pool,
                publish,
                interval=settings.read_flush_interval,
                receipts_max=settings.receipts_max_members,
            )
            reads.start()
            stack.push_async_callback(reads.close)
            presence = Presence(
                pool,
                publish,
                interval=settings.presence_interval,
                grace=settings.presence_grace,
                timeout=settings.presence_timeout,
                ready_limit=settings.presence_ready_limit,
            )
            await presence.start()
            stack.push_async_callback(presence.close)
            typing = Typing(backend.publish_many, ttl=settings.typing_timeout)
            stack.callback(typing.close)
            for kind, listener in (
                (PRESENCE_SIGNAL, presence),
                (TYPING_SIGNAL, typing),
                (TYPING_STOP, typing),
            ):
                hub.listen(kind, listener)
            presence.attach(hub.deliver)
            typing.attach(hub.deliver)
            services = Services(
                settings=settings,
                pool=pool,
                writer=writer,
                tokens=tokens,
                publish=publish,
                limits=UserLimits.from_settings(settings),
                metrics=metrics,
                reads=reads,
                presence=presence,
                typing=typing,
            )
            # What start-up made (modules, routes, schemas: ~half a million objects) lives as
            # long as the process: out of the collector's sight, a full collection takes a few
            # ms instead of ~70 ms of stopped event loop (docs/benchmarks.md, round 4).
            gc.freeze()
            if settings.dev_auth_enabled and not settings.listens_on_loopback:
                log.warning(
                    "CHAT_DEV_AUTH is on and the service listens on %s, not loopback: ANYONE "
                    "who can reach it can sign in as ANYONE (POST /auth/dev-token)",
                    settings.listen_host or "an unknown address",
                )
            yield {
                "services": services,
                "hub": hub,
                "listen": backend,
                "engine": engine,
                GUARD_STATE_KEY: ConnectionGuard(settings, metrics),
            }

    docs = settings.docs_enabled  # off a loopback listener only with CHAT_PUBLIC_DOCS=true
    app = FastAPI(
        title="chat-service",
        summary="Rooms, history and live messages, persisted in PostgreSQL.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.include_router(manage_routes.router)
    app.include_router(room_routes.router)
    app.include_router(webhook_routes.router)
    app.include_router(auth_routes.router)
    app.include_router(auth_routes.me_router)
    app.include_router(websocket_routes.router)

    @app.exception_handler(ChatError)
    async def chat_error(request: Request, exc: ChatError) -> JSONResponse:
        """Status, body and headers as the error tree (``service.errors``) says."""
        if exc.http_status is None:  # a websocket-only error cannot reach REST but by a bug
            return await internal_error(request, exc)
        return JSONResponse(exc.body(), status_code=exc.http_status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's default echoes the offending input, which may not even be encodable
        (lone surrogates, NaN, absurd nesting): answer with where and why only."""
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        """Details stay in the server log, tied to the request id the client is given."""
        log.error("unhandled error", exc_info=exc)
        rid = request_id.get()
        internal = InternalError("internal error")
        return JSONResponse(
            {**internal.body(), "request_id": rid},
            status_code=InternalError.http_status,
            # Answered outside the middleware stack: the security headers are added here.
            headers={"X-Request-ID": rid, **security_headers()},
        )

    docs_paths = (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    app.add_middleware(
        GuardMiddleware,
        body_limit=settings.body_limit,
        docs_paths=frozenset(path for path in docs_paths if path),
    )
    app.add_middleware(RequestIdMiddleware)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        responses={503: {"description": "Not ready: the failing checks are named"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: database reachable with a schema this release runs against (its head, or
        a later one declared compatible with it), LISTEN connection up.
        Anyone may ask, so the answer names the failing check only: why it fails (a host, a
        user, a driver error) goes to the log."""
        problems = {
            "database": await database_check(request.state.engine, schema),
            "listen": None if request.state.listen.connected else "LISTEN connection down",
        }
        for name, problem in problems.items():
            if problem is not None:
                log.warning("not ready: %s check fails: %s", name, problem)
        checks = {name: "ok" if p is None else "failing" for name, p in problems.items()}
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    metrics_token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    metrics_open = metrics_token is None and settings.listens_on_loopback

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        """With CHAT_METRICS_TOKEN, for its bearer only; without, on a loopback listener only."""
        if metrics_token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), metrics_token.encode()
            ):
                raise NotAuthenticated("metrics need CHAT_METRICS_TOKEN")
        elif not metrics_open:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        """Browsers ask for it on every site, whatever the page links: a 404 fills logs."""
        return FileResponse(
            STATIC_DIR / "favicon.ico",
            media_type="image/vnd.microsoft.icon",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
