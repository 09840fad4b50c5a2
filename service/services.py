"""What the lifespan builds once per process and every handler reads from ``request.state``.

The fan-out's ``RoomHub`` is not here: only the websocket endpoint uses it, and it reads it from
its own state key (``hub``), so this module, and REST with it, does not depend on
``service.realtime``."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from service.auth import TokenCodec
from service.chat.limits import UserLimits
from service.chat.messages import Publish
from service.chat.presence import Presence
from service.chat.reads import ReadCursors
from service.chat.typing import Typing
from service.config import Settings
from service.db.writer import MessageWriter
from service.metrics import Metrics


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    pool: asyncpg.Pool
    """Connections for reads; writes go through ``writer``."""
    writer: MessageWriter
    tokens: TokenCodec
    publish: Publish | None
    """None when NOTIFY goes out inside the insert transaction (the default)."""
    limits: UserLimits
    metrics: Metrics
    reads: ReadCursors
    presence: Presence
    typing: Typing
