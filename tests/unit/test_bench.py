"""The saturate ramp's bisection, how rounds are summed up, and the documented commands."""

from __future__ import annotations

from typing import Any

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


def test_scenarios_without_a_trivial_counterpart_measure_chat_only() -> None:
    from benchmarks.bench import CHAT_ONLY, build_parser, resolve

    for scenario in CHAT_ONLY:
        assert resolve(build_parser().parse_args([scenario, "--tiny"])).only == "chat"
        with pytest.raises(SystemExit):
            resolve(build_parser().parse_args([scenario, "--only", "trivial"]))


def test_reads_and_reactions_are_options_of_fanout_and_saturate_only() -> None:
    from benchmarks.bench import build_parser, resolve

    for scenario in ("fanout", "saturate"):
        argv = [scenario, "--read-rate", "1", "--reaction-rate", "50"]
        args = resolve(build_parser().parse_args(argv))
        assert (args.read_rate, args.reaction_rate) == (1.0, 50.0)
        assert resolve(build_parser().parse_args([scenario])).read_rate == 0.0
    for argv in (["history", "--read-rate", "1"], ["fanout", "--reaction-rate", "-1"]):
        with pytest.raises(SystemExit):
            resolve(build_parser().parse_args(argv))


def _room_of_two() -> tuple[Any, Any, Any]:
    from benchmarks.bench_client import Load, Peer

    sender, receiver = (Peer("r", 0, "ws://x", "t") for _ in range(2))
    load = Load([sender, receiver], 10, reaction_rate=1.0)
    for peer in (sender, receiver):
        peer.ready_at = 1.0
        peer.last_seq = 4  # the ready frame's
    return load, sender, receiver


def _text(seq: int, index: int) -> bytes:
    return (
        f'{{"type":"message","room":"r","seq":{seq},"id":9,"created_at":"2026-01-01T00:00:00'
        f'.000000Z","kind":"text","author":"a","body":"b","client_msg_id":"{index}"}}'
    ).encode()


def _reaction(seq: int) -> bytes:
    return (
        f'{{"type":"message","room":"r","seq":{seq},"id":9,"created_at":"2026-01-01T00:00:00'
        f'.000000Z","kind":"reaction","author":"a","target_seq":5,"emoji":"x","on":true,'
        f'"client_msg_id":"r1"}}'
    ).encode()


def test_reaction_items_take_seqs_in_the_stream_without_counting_as_messages() -> None:
    load, sender, receiver = _room_of_two()
    load.send_t.append(0.0)
    load.room_of.append(0)
    load.step_of.append(1)
    load.acked.append(0)
    load.latency[1] = []
    load.ack_latency[1] = []
    load.step = 1
    receiver.on_text(_text(5, 0))
    receiver.on_text(_reaction(6))
    sender.on_text(b'{"type":"ack","client_msg_id":"r1","seq":6}')
    assert (receiver.last_seq, receiver.last_text_seq, receiver.reactions_seen) == (6, 5, 1)
    assert len(load.latency[1]) == 1  # the text's only
    assert load.reaction_items[1][0] == 1 and load.room_last[0] == 6
    assert load.gaps[1] == load.out_of_order[1] == 0
    assert load._behind([sender, receiver]) == 1  # the sender has not received seq 6 yet
    receiver.on_text(_reaction(8))  # seq 7 never came
    receiver.on_text(_reaction(8))  # and 8 twice
    assert (load.gaps[1], load.out_of_order[1]) == (1, 1)
    assert not load.errors


def test_a_reactions_error_is_not_a_messages() -> None:
    load, sender, _ = _room_of_two()
    load.reactions_unanswered = 1
    sender.on_text(b'{"type":"error","code":"not_found","client_msg_id":"r3"}')
    sender.on_text(b'{"type":"error","code":"overloaded","client_msg_id":"3"}')
    sender.on_text(b'{"type":"receipt","room":"r","user":"u","seq":5}')
    assert load.reaction_errors == {0: {"not_found": 1}}
    assert load.reactions_unanswered == 0
    assert load.errors == {"error_frame:overloaded": 1}
    assert sender.receipts_heard == 1
