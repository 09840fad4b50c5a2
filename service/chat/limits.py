"""Flood control: token buckets for sends, a cap on connections. Per process, in memory.

Limits are per process: with P replicas a user gets at most P times the per-user budget, which
still bounds a flood; exact global limits would cost a database round trip per message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.errors import ChatError


class RateLimited(ChatError):
    code = "rate_limited"
    http_status = 429

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many messages; retry in {retry_after:.2f}s")
        self.retry_after = retry_after


class TooManyConnections(ChatError):
    code = "too_many_connections"
    http_status = 429


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, up to ``burst``; ``take`` refuses with the wait it needs."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.updated = self.clock()

    def take(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            raise RateLimited((1 - self.tokens) / self.rate)
        self.tokens -= 1

    @property
    def full(self) -> bool:
        return self.tokens + (self.clock() - self.updated) * self.rate >= self.burst


class UserLimits:
    """Per-user send buckets and connection counts for one process."""

    def __init__(self, *, send_rate: float, max_connections: int) -> None:
        self._send_rate = send_rate
        self._max_connections = max_connections
        self._buckets: dict[str, TokenBucket] = {}
        self._connections: dict[str, int] = {}

    def take_send(self, user: str) -> None:
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) > 10_000:  # forget idle users so the map stays bounded
                self._buckets = {u: b for u, b in self._buckets.items() if not b.full}
            bucket = self._buckets[user] = TokenBucket(self._send_rate, self._send_rate * 2)
        bucket.take()

    def connect(self, user: str) -> None:
        count = self._connections.get(user, 0)
        if count >= self._max_connections:
            raise TooManyConnections(
                f"at most {self._max_connections} connections per user on this server"
            )
        self._connections[user] = count + 1

    def disconnect(self, user: str) -> None:
        count = self._connections.get(user, 0) - 1
        if count > 0:
            self._connections[user] = count
        else:
            self._connections.pop(user, None)
