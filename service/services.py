"""What the lifespan builds once per process and every handler reads from ``request.state``."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from service.auth import TokenCodec
from service.chat.limits import UserLimits
from service.chat.messages import Publish
from service.config import Settings
from service.db.writer import MessageWriter
from service.metrics import Metrics
from service.realtime.hub import RoomHub


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    pool: asyncpg.Pool
    """Connections for reads; writes go through ``writer``."""
    writer: MessageWriter
    hub: RoomHub
    tokens: TokenCodec
    publish: Publish | None
    """None when NOTIFY goes out inside the insert transaction (the default)."""
    limits: UserLimits
    metrics: Metrics
