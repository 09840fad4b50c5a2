"""The saturate ramp's bisection: where it probes between a sustained and a failed rate."""

from __future__ import annotations

import pytest

from benchmarks.bench import refined_rate


@pytest.mark.parametrize(
    ("sustained", "failed", "probe"),
    [
        (2800, 3200, 3000),
        (2800, 3000, 2900),
        (2900, 3000, 2950),
        (0, 100, 50),
        (50, 100000, 50000),
    ],
)
def test_probes_halfway_on_a_50_grid(sustained: float, failed: float, probe: float) -> None:
    assert refined_rate(sustained, failed) == probe


@pytest.mark.parametrize(("sustained", "failed"), [(2950, 3000), (3000, 3000), (2975, 3000)])
def test_stops_when_the_grid_has_nothing_between(sustained: float, failed: float) -> None:
    assert refined_rate(sustained, failed) is None
