"""The per-user limiter maps: bounded, cheap to keep bounded, and the budgets they hold."""

from __future__ import annotations

import pytest

from service.chat.limits import SWEEP_PAUSE, BucketMap, TokenBucket, UserLimits
from service.config import Settings
from service.errors import RateLimited, TooManyConnections


class Clock:
    """A clock that moves only when told to, and counts how often it was read."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_a_full_map_refuses_new_users_until_idle_ones_can_be_forgotten():
    clock = Clock()
    buckets = BucketMap(rate=1, burst=1, cap=3, clock=clock)
    for user in "abc":
        buckets.get(user).take()  # each now busy (not full)
    with pytest.raises(RateLimited) as refused:
        buckets.get("d")
    assert 0 < refused.value.retry_after <= SWEEP_PAUSE
    assert len(buckets) == 3
    assert buckets.get("a") is not None  # known users are still served at the cap
    clock.now += max(1.0, SWEEP_PAUSE)  # a, b and c are full again: idle
    buckets.get("d").take()
    assert len(buckets) == 1


def test_idle_users_are_forgotten_at_an_amortised_cost():
    """20,000 busy users: before, every new one past 10,000 re-filtered the whole map."""
    clock = Clock()
    buckets = BucketMap(rate=1, burst=2, cap=100_000, clock=clock)
    users = 20_000
    for i in range(users):
        buckets.get(f"u{i}").take()
    assert len(buckets) == users  # none idle: none forgotten
    assert clock.reads < 5 * users  # each bucket checked O(1) times on average, not O(n)


def test_a_map_at_its_cap_sweeps_at_most_once_per_pause():
    clock = Clock()
    buckets = BucketMap(rate=1, burst=2, cap=2_000, clock=clock)
    for i in range(2_000):
        buckets.get(f"u{i}").take()
    reads = clock.reads
    for i in range(1_000):
        with pytest.raises(RateLimited):
            buckets.get(f"new-{i}")
    assert clock.reads - reads < 2_000 + 2 * 1_000  # one sweep, not one per refused user


def test_connection_counts_are_capped_by_users_too():
    limits = UserLimits(send_rate=1, max_connections=2, max_users=2)
    limits.connect("a")
    limits.connect("a")
    with pytest.raises(TooManyConnections, match="at most 2"):
        limits.connect("a")
    limits.connect("b")
    with pytest.raises(TooManyConnections, match="too many users"):
        limits.connect("c")
    limits.disconnect("b")
    limits.connect("c")


def test_connects_are_rate_limited_per_user():
    clock = Clock()
    limits = UserLimits(
        send_rate=1, max_connections=100, connect_rate=0.5, connect_burst=2, clock=clock
    )
    limits.admit("a")
    limits.admit("a")
    with pytest.raises(RateLimited, match="too many connects") as refused:
        limits.admit("a")
    assert refused.value.retry_after == pytest.approx(2.0)
    limits.admit("b")
    clock.now += 2
    limits.admit("a")


def test_replay_debt_refuses_connects_until_it_is_paid_off():
    clock = Clock()
    limits = UserLimits(
        send_rate=1, max_connections=100, replay_budget=1000, replay_interval=10, clock=clock
    )
    limits.admit("a")
    limits.charge_replay("a", 1500)  # a replay is sent whole, whatever it costs
    with pytest.raises(RateLimited, match="replayed") as refused:
        limits.admit("a")
    assert refused.value.retry_after == pytest.approx(5.0)  # 500 bytes at 100 bytes/s
    limits.admit("b")
    clock.now += 5
    limits.admit("a")


def test_token_bucket_try_take_drops_without_raising():
    clock = Clock()
    bucket = TokenBucket(1, 2, clock)
    assert [bucket.try_take() for _ in range(3)] == [True, True, False]
    clock.now += 1
    assert bucket.try_take()


def test_limits_come_from_settings():
    settings = Settings(
        ws_connect_rate=3, ws_connect_burst=1, max_connections_per_user=5, limiter_max_users=7
    )
    limits = UserLimits.from_settings(settings)
    limits.admit("a")
    with pytest.raises(RateLimited):
        limits.admit("a")
