"""Flood control: token buckets for sends, connects, pings and replayed bytes; a cap on
connections. Per process, in memory.

Limits are per process: with P replicas a user gets at most P times the per-user budget, which
still bounds a flood; exact global limits would cost a database round trip per message.

Every per-user map is bounded (``max_users`` entries): idle buckets (full again) are forgotten
first, in sweeps whose cost is amortised over the insertions between them; past the cap a new
user is refused (``RateLimited``) rather than the map grown. The errors are
``service.errors``'.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.errors import RateLimited, TooManyConnections

if TYPE_CHECKING:
    from service.config import Settings


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, up to ``burst``; ``take`` refuses with the wait it needs.

    ``spend`` may take the bucket below zero (a debt): used for amounts only known after the
    fact, such as the bytes of a replay; ``check`` then refuses until the debt is paid off.
    """

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.updated = self.clock()

    def _refill(self) -> float:
        now = self.clock()
        self.tokens = tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return tokens

    def take(self) -> None:
        if self._refill() < 1:
            raise RateLimited((1 - self.tokens) / self.rate)
        self.tokens -= 1

    def try_take(self) -> bool:
        """``take`` without the exception, for callers that only drop what is over."""
        if self._refill() < 1:
            return False
        self.tokens -= 1
        return True

    def spend(self, amount: float) -> None:
        self._refill()
        self.tokens -= amount

    def check(self, detail: str) -> None:
        """Refuse while in debt, with the wait until the bucket is back at zero."""
        if self._refill() < 0:
            raise RateLimited(-self.tokens / self.rate, detail)

    @property
    def full(self) -> bool:
        return self.tokens + (self.clock() - self.updated) * self.rate >= self.burst


MIN_SWEEP = 1024
"""A map is not swept below this many entries: small maps need no care."""
SWEEP_PAUSE = 1.0
"""Seconds between sweeps of a map at its cap (each is a pass over every entry)."""


class BucketMap:
    """``TokenBucket``s by user, at most ``cap`` of them.

    A sweep (forget the full buckets) runs when the map reaches ``2 x`` its size after the last
    sweep, so each insertion pays O(1) on average; at the cap, at most one sweep per
    ``SWEEP_PAUSE``, and a new user is refused while the map stays full.
    """

    __slots__ = ("_buckets", "_burst", "_cap", "_clock", "_next_sweep", "_rate", "_sweep_at")

    def __init__(
        self, rate: float, burst: float, *, cap: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._cap = cap
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._sweep_at = min(cap, MIN_SWEEP)
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, user: str) -> TokenBucket:
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._make_room()
            bucket = self._buckets[user] = TokenBucket(self._rate, self._burst, self._clock)
        return bucket

    def _make_room(self) -> None:
        now = self._clock()
        if len(self._buckets) < self._cap or now >= self._next_sweep:
            self._buckets = {u: b for u, b in self._buckets.items() if not b.full}
            self._sweep_at = min(self._cap, max(MIN_SWEEP, 2 * len(self._buckets)))
            self._next_sweep = now + SWEEP_PAUSE
        if len(self._buckets) >= self._cap:
            raise RateLimited(
                max(self._next_sweep - now, 0.001), "too many active users on this server"
            )


class UserLimits:
    """Per-user send, connect and replay budgets and connection counts for one process."""

    def __init__(
        self,
        *,
        send_rate: float,
        max_connections: int,
        connect_rate: float = 1.0,
        connect_burst: int = 10,
        replay_budget: int = 32 * 1024 * 1024,
        replay_interval: float = 60.0,
        max_users: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_connections = max_connections
        self._max_users = max_users
        self._sends = BucketMap(send_rate, send_rate * 2, cap=max_users, clock=clock)
        self._connects = BucketMap(connect_rate, connect_burst, cap=max_users, clock=clock)
        self._replays = BucketMap(
            replay_budget / replay_interval, replay_budget, cap=max_users, clock=clock
        )
        self._connections: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> UserLimits:
        return cls(
            send_rate=settings.user_send_rate,
            max_connections=settings.max_connections_per_user,
            connect_rate=settings.ws_connect_rate,
            connect_burst=settings.ws_connect_burst,
            replay_budget=settings.ws_replay_budget,
            replay_interval=settings.ws_replay_interval,
            max_users=settings.limiter_max_users,
        )

    def take_send(self, user: str) -> None:
        self._sends.get(user).take()

    def admit(self, user: str) -> None:
        """A new websocket of ``user``, before it is accepted: within the connect rate, not
        in replay debt, under the connection cap. Counted until ``disconnect``."""
        bucket = self._connects.get(user)
        try:
            bucket.take()
        except RateLimited as exc:
            raise RateLimited(exc.retry_after, "too many connects; retry later") from None
        self._replays.get(user).check("too much history replayed recently; retry later")
        self.connect(user)

    def charge_replay(self, user: str, size: int) -> None:
        """Bytes a connect's replay sent to ``user`` (never refused: already read)."""
        try:
            self._replays.get(user).spend(size)
        except RateLimited:
            pass  # the map is full of users in debt: this one's debt goes unrecorded

    def connect(self, user: str) -> None:
        count = self._connections.get(user, 0)
        if count >= self._max_connections:
            raise TooManyConnections(
                f"at most {self._max_connections} connections per user on this server"
            )
        if count == 0 and len(self._connections) >= self._max_users:
            raise TooManyConnections("too many users connected to this server")
        self._connections[user] = count + 1

    def disconnect(self, user: str) -> None:
        count = self._connections.get(user, 0) - 1
        if count > 0:
            self._connections[user] = count
        else:
            self._connections.pop(user, None)
