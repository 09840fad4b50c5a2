from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service.metrics import LoopHistogram


def _samples(registry: CollectorRegistry) -> list[str]:
    lines = generate_latest(registry).decode().splitlines()
    return [line for line in lines if not line.startswith("#") and "_created" not in line]


def test_the_loop_histogram_exports_what_prometheus_clients_histogram_does():
    buckets = (0.001, 0.005, 0.01, 1)
    values = [0.0, 0.0005, 0.001, 0.0011, 0.005, 0.2, 1, 7.5]
    reference, ours = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("lat_seconds", "latency", buckets=buckets, registry=reference)
    loop_histogram = LoopHistogram("lat_seconds", "latency", buckets=buckets)
    ours.register(loop_histogram)
    for value in values:
        histogram.observe(value)
        loop_histogram.observe(value)
    assert _samples(ours) == _samples(reference)
    assert 'lat_seconds_bucket{le="0.001"} 3.0' in _samples(ours)  # "le": bounds included
