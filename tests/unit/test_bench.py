"""The saturate ramp's bisection, how rounds are summed up, and the documented commands."""

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


def _saturate(rate: float) -> dict[str, float]:
    return {"sustained_rate": rate}


def test_the_median_round_is_reported_and_ratios_pair_the_rounds() -> None:
    from benchmarks.bench import median_round, round_ratios

    chat = [_saturate(r) for r in (4400, 3900, 5600)]
    trivial = [_saturate(r) for r in (5100, 5300, 4600)]
    assert median_round("saturate", chat) == _saturate(4400)
    assert median_round("saturate", chat[:2]) == _saturate(3900)  # even: the lower one
    rounds = [{"trivial": t, "chat": c} for t, c in zip(trivial, chat, strict=True)]
    assert round_ratios("saturate", rounds) == [0.863, 0.736, 1.217]


def test_a_fanout_round_without_a_latency_sorts_last() -> None:
    from benchmarks.bench import median_round

    runs = [{"latency_ms": {"p99": p99}} for p99 in (None, 3.1, 2.7)]
    assert median_round("fanout", runs) == {"latency_ms": {"p99": 3.1}}


def test_one_round_of_any_scenario_is_its_own_median() -> None:
    from benchmarks.bench import SCENARIOS, median_round

    for scenario in SCENARIOS:
        assert median_round(scenario, [{"rss_per_connection_kb": 22.4}]) == {
            "rss_per_connection_kb": 22.4
        }


def test_the_docs_table_has_one_working_command_per_scenario() -> None:
    """docs/benchmarks.md's "How to run" table is what people (and old-vs-new comparisons)
    run: every scenario has a row, and every row parses with the real parser."""
    import re
    import shlex
    from pathlib import Path

    from benchmarks.bench import SCENARIOS, build_parser, resolve

    docs = (Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md").read_text()
    table = docs.split("## How to run", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"`python -m (benchmarks\.\w+)( [^`]*)?`", table)
    bench = [shlex.split(args) for module, args in commands if module == "benchmarks.bench"]
    assert {argv[0] for argv in bench} == set(SCENARIOS)
    for argv in bench:
        assert resolve(build_parser().parse_args(argv)).scenario == argv[0]
    assert ("benchmarks.soak", "") in commands
