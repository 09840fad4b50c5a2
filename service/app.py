"""The app factory. The lifespan is the one place where connections are made and closed."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from broadcaster import Broadcast
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from service.api import auth as auth_routes
from service.api import rooms as room_routes
from service.auth import TokenCodec
from service.chat.limits import RateLimited, UserLimits
from service.config import Settings
from service.db.engine import create_engine, create_sessionmaker
from service.errors import ChatError
from service.observability import RequestIdMiddleware, request_id
from service.realtime import websocket as websocket_routes
from service.realtime.backend import ListenBackend
from service.realtime.hub import RoomHub
from service.services import Services

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; with no argument, settings come from the environment (uvicorn --factory)."""
    settings = settings or Settings()
    settings.require_database_url()
    tokens = TokenCodec(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Services]]:
        async with AsyncExitStack() as stack:
            engine = create_engine(settings)
            stack.push_async_callback(engine.dispose)
            sessionmaker = create_sessionmaker(engine)
            backend = ListenBackend(settings.listen_dsn)
            broadcast = Broadcast(backend=backend)
            await stack.enter_async_context(broadcast)
            hub = RoomHub(broadcast, sessionmaker, settings.outbox_limit)
            stack.push_async_callback(hub.close)
            services = Services(
                settings=settings,
                sessionmaker=sessionmaker,
                hub=hub,
                tokens=tokens,
                publish=None if settings.notify_in_transaction else broadcast.publish,
                limits=UserLimits(
                    send_rate=settings.user_send_rate,
                    max_connections=settings.max_connections_per_user,
                ),
            )
            yield {"services": services}

    app = FastAPI(
        title="chat-service",
        summary="Rooms, history and live messages, persisted in PostgreSQL.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.include_router(room_routes.router)
    app.include_router(auth_routes.router)
    app.include_router(websocket_routes.router)

    @app.exception_handler(ChatError)
    async def chat_error(_request: Request, exc: ChatError) -> JSONResponse:
        headers = {}
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return JSONResponse(
            {"detail": exc.detail, "code": exc.code}, status_code=exc.http_status, headers=headers
        )

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        """Details stay in the server log, tied to the request id the client is given."""
        log.error("unhandled error", exc_info=exc)
        rid = request_id.get()
        return JSONResponse(
            {"detail": "internal error", "code": "internal", "request_id": rid},
            status_code=500,
            headers={"X-Request-ID": rid},
        )

    app.add_middleware(RequestIdMiddleware)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
