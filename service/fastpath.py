"""Which protocols ``chat-service serve`` gives uvicorn: the fast path, or the public ASGI path.

The fast path (``service.uvicorn_http``, ``service.realtime.uvicorn_ws``) subclasses uvicorn's
httptools and websockets-sansio protocols: frames shared by a room, bursts written without the
ASGI ``send``, the routing frames detached from idle connections (docs/benchmarks.md). It leans
on their internals, so it is chosen only when they are what it was written for: a uvicorn in
``FAST_UVICORN``, its modules importable, every method it overrides or calls there with the same
parameters, and the attributes it uses set up by their constructors, checked at start-up
(``check``). Anything else, or ``CHAT_FAST_PATH=off``, chooses the public path: uvicorn's own
protocols chosen by name, wrapped at asyncio's ``Protocol`` interface by
``service.http_guard.GuardedProtocol``, and the websocket endpoint awaiting ASGI
``websocket.send`` for every frame. Clients see the same protocol on both; what
differs is speed, memory per idle connection, and what is logged for a few bad inputs
(docs/operations.md, "The fast path"). One INFO line says which path and why.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Literal

from service.http_guard import GuardedProtocol

log = logging.getLogger(__name__)

FAST_UVICORN = ((0, 55), (0, 56))
"""uvicorn versions (``>=``, ``<``, major and minor) whose internals the fast path was written
against; a newer uvicorn runs the public path until the fast path is checked against it."""

PUBLIC_WS = "websockets-sansio"
"""uvicorn's websocket protocol on the public path, by name (the fast path's parent: the same
frames and answers for clients). Older uvicorns without it use ``websockets``."""

_Params = tuple[str, ...]

_WS_METHODS: dict[str, _Params] = {
    "connection_made": ("self", "transport"),
    "connection_lost": ("self", "exc"),
    "data_received": ("self", "data"),
    "run_asgi": ("self",),
    "send": ("self", "message"),
    "send_receive_event_to_app": ("self",),
    "send_500_response": ("self",),
    "handle_parser_exception": ("self",),
}
_WS_ATTRIBUTES = (
    "app",
    "app_state",
    "client",
    "close_sent",
    "close_timer",
    "conn",
    "curr_msg_data_type",
    "disconnected",
    "frames",
    "handshake_complete",
    "handshake_initiated",
    "initial_response",
    "logger",
    "queue",
    "read_paused",
    "transport",
    "writable",
)
_HTTP_METHODS: dict[str, _Params] = {
    "connection_made": ("self", "transport"),
    "connection_lost": ("self", "exc"),
    "data_received": ("self", "data"),
    "on_message_begin": ("self",),
    "on_headers_complete": ("self",),
    "handle_websocket_upgrade": ("self",),
    "_should_upgrade": ("self",),
}
_HTTP_ATTRIBUTES = ("app_state", "connections", "parser", "transport")
_WEBSOCKETS_CONN_METHODS: dict[str, _Params] = {
    "send_text": ("self", "data", "fin"),
    "send_close": ("self", "code", "reason"),
    "data_to_send": ("self",),
}
_WEBSOCKETS_CONN_ATTRIBUTES = ("expect_continuation_frame", "extensions", "handshake_exc", "state")


@dataclass(frozen=True)
class Protocols:
    """uvicorn's ``http`` and ``ws`` options, and why they were chosen."""

    fast: bool
    http: type[asyncio.Protocol]
    ws: str | type[asyncio.Protocol]
    reason: str


def choose(mode: Literal["auto", "off"]) -> Protocols:
    """The fast path if ``mode`` allows it and ``check`` finds nothing wrong, else the public
    path; logged in one INFO line."""
    if mode == "off":
        problem: str | None = "CHAT_FAST_PATH=off"
    else:
        problem = check()
    if problem is None:
        from service.realtime.uvicorn_ws import LeanWebSocketProtocol  # noqa: PLC0415
        from service.uvicorn_http import GuardedHttpToolsProtocol  # noqa: PLC0415

        chosen = Protocols(
            True,
            GuardedHttpToolsProtocol,
            LeanWebSocketProtocol,
            f"uvicorn {_uvicorn_version()}'s internals are the ones it was written for",
        )
    else:
        chosen = Protocols(False, GuardedProtocol, public_ws(), problem)
    log.info(
        "%s: %s", "fast path" if chosen.fast else "public ASGI path (fast path off)", chosen.reason
    )
    return chosen


def public_ws() -> str:
    """``PUBLIC_WS`` if this uvicorn has it, else its legacy ``websockets`` protocol."""
    from uvicorn.config import WS_PROTOCOLS  # noqa: PLC0415

    return PUBLIC_WS if PUBLIC_WS in WS_PROTOCOLS else "websockets"


def _uvicorn_version() -> str:
    import uvicorn  # noqa: PLC0415

    return str(uvicorn.__version__)


def check() -> str | None:
    """Why the fast path must not run on the installed uvicorn and websockets, or None."""
    version = _uvicorn_version()
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return f"uvicorn {version}: version not understood"
    low, high = FAST_UVICORN
    if not low <= major_minor < high:
        return (
            f"uvicorn {version} is not in the range the fast path was checked against "
            f"(>={_dotted(low)},<{_dotted(high)})"
        )
    try:
        ws = import_module("uvicorn.protocols.websockets.websockets_sansio_impl")
        http = import_module("uvicorn.protocols.http.httptools_impl")
        frames = import_module("websockets.frames")
        protocol = import_module("websockets.protocol")
        server = import_module("websockets.server")
    except ImportError as exc:
        return f"cannot import {exc.name}"
    try:  # what they import at the top, from uvicorn and websockets
        import_module("service.realtime.uvicorn_ws")
        import_module("service.uvicorn_http")
    except ImportError as exc:
        return f"the fast path cannot import {exc.name}: {exc}"
    if not hasattr(protocol, "State") or not hasattr(protocol.State, "OPEN"):
        return "websockets.protocol.State.OPEN is missing"
    if not hasattr(frames, "Frame") or not hasattr(frames, "Opcode"):
        return "websockets.frames.Frame or Opcode is missing"
    serialize = _params(getattr(frames.Frame, "serialize", None))
    if serialize is None or not {"mask", "extensions"} <= set(serialize):
        return "websockets' Frame.serialize does not take mask and extensions"
    return (
        differs(getattr(ws, "WebSocketsSansIOProtocol", None), _WS_METHODS, _WS_ATTRIBUTES)
        or differs(getattr(http, "HttpToolsProtocol", None), _HTTP_METHODS, _HTTP_ATTRIBUTES)
        or differs(
            getattr(server, "ServerProtocol", None),
            _WEBSOCKETS_CONN_METHODS,
            _WEBSOCKETS_CONN_ATTRIBUTES,
        )
    )


def differs(cls: type | None, methods: dict[str, _Params], attributes: Iterable[str]) -> str | None:
    """What of ``methods`` (name: parameter names) and instance ``attributes`` (assigned by
    some ``__init__`` in ``cls``'s MRO) ``cls`` lacks, or None."""
    if cls is None:
        return "a class the fast path subclasses or calls is missing"
    for name, expected in methods.items():
        method = getattr(cls, name, None)
        found = _params(method)
        if found is None:
            return f"{cls.__qualname__}.{name} is missing"
        extra = list(inspect.signature(method).parameters.values())[len(expected) :]  # type: ignore[arg-type]
        if found[: len(expected)] != expected or any(
            p.default is inspect.Parameter.empty for p in extra
        ):
            return f"{cls.__qualname__}.{name}{found} is not {name}{expected}"
    assigned: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        code = getattr(init, "__code__", None)
        if code is not None:
            assigned.update(code.co_names)
    for name in attributes:
        if name not in assigned and not hasattr(cls, name):
            return f"{cls.__qualname__} no longer sets {name}"
    return None


def _params(function: Callable[..., Any] | None) -> _Params | None:
    if not callable(function):
        return None
    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None


def _dotted(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))
