"""The benchmark suite works: every scenario once at ``--tiny`` size, as a user runs it.

Benchmarks are not timed tests: these check that each scenario runs to the end against real
servers and reports sane figures (no loss, no duplicates, a sustained step, an RSS figure,
every history percentile), never how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT = 90


def run_bench(scenario: str, database_url: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    report = tmp_path / f"{scenario}.json"
    argv = [sys.executable, "-m", "benchmarks.bench", scenario, "--tiny"]
    argv += ["--database-url", database_url, "--json", str(report), *extra]
    proc = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT, check=False
    )
    output = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, output
    data = json.loads(report.read_text())
    assert data["scenario"] == scenario
    assert data["violations"] == [], output
    only = extra[extra.index("--only") + 1] if "--only" in extra else None
    targets = {only} if only else {"chat", "trivial", "ratio"}
    assert set(data) >= {*targets, "machine", "rlimit_nofile"}, output
    rtt = data["machine"]["process_round_trip_us"]
    assert 0 < rtt["p50"] <= rtt["p99"] <= rtt["max"], rtt
    return data


@pytest.mark.timeout(SCENARIO_TIMEOUT + 30)
def test_fanout(fresh_database, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = run_bench("fanout", fresh_database(), tmp_path)
    for name in ("chat", "trivial"):
        result = data[name]
        assert result["sent"] > 0
        assert result["acked"] == result["sent"]
        assert result["lost"] == 0
        assert result["duplicated"] == 0
        assert result["out_of_order"] == 0
        assert result["delivered"] == result["expected_deliveries"] > 0
        assert result["latency_ms"]["p99"] is not None
        assert result["connect_ready_ms"]["p50"] is not None
    assert data["ratio"]["deliveries_per_s"] > 0


@pytest.mark.timeout(SCENARIO_TIMEOUT + 30)
def test_fanout_alternates_the_targets_for_rounds(  # type: ignore[no-untyped-def]
    fresh_database, tmp_path: Path
) -> None:
    data = run_bench("fanout", fresh_database(), tmp_path, "--rounds", "2")
    assert [sorted(both) for both in data["rounds"]] == [["chat", "trivial"]] * 2
    for both in data["rounds"]:
        for result in both.values():
            assert result["lost"] == result["duplicated"] == 0
            assert result["delivered"] == result["expected_deliveries"] > 0
    assert len(data["round_ratios"]) == 2
    p99s = sorted(both["chat"]["latency_ms"]["p99"] for both in data["rounds"])
    assert data["chat"]["latency_ms"]["p99"] == p99s[0]  # the median of two: the lower one


@pytest.mark.timeout(SCENARIO_TIMEOUT + 30)
def test_saturate(fresh_database, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = run_bench("saturate", fresh_database(), tmp_path)
    for name in ("chat", "trivial"):
        result = data[name]
        assert result["steps"]
        assert result["sustained_rate"] > 0, result["stop_reason"]
        assert result["sustained_deliveries_per_s"] > 0
    assert data["ratio"]["sustained_rate"] > 0


@pytest.mark.timeout(SCENARIO_TIMEOUT + 30)
def test_saturate_bisects_after_the_first_failed_step(  # type: ignore[no-untyped-def]
    fresh_database, tmp_path: Path
) -> None:
    # No generator sends 100,000 msg/s: that step fails, and so does the bisection (50,000).
    # Short steps and drain: a failed step costs the sends it makes (10,000, then 5,000).
    extra = ("--only", "trivial", "--rates", "50,100000", "--max-rate", "100000")
    extra += ("--refine", "1", "--step-seconds", "0.1", "--drain", "1")
    data = run_bench("saturate", fresh_database(), tmp_path, *extra)
    result = data["trivial"]
    rates = [(s["rate_target"], s["sustained"], s["refinement"]) for s in result["steps"]]
    assert rates == [
        (50, True, False),
        (100000, False, False),
        (50000, False, True),
    ]
    assert result["sustained_rate"] == 50
    assert result["lowest_failed_rate"] == 50000


@pytest.mark.timeout(SCENARIO_TIMEOUT + 30)
def test_idle(fresh_database, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = run_bench("idle", fresh_database(), tmp_path)
    for name in ("chat", "trivial"):
        result = data[name]
        assert result["still_open"] == result["connections"] == 50
        assert result["rss_after_kb"] > 0
    assert data["chat"]["rss_per_connection_kb"] > 0
    assert data["rlimit_nofile"]["soft"] > 0


@pytest.mark.timeout(SCENARIO_TIMEOUT + 30)
def test_history(fresh_database, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = run_bench("history", fresh_database(), tmp_path)
    kinds = [
        "ws_connect_history50",
        "ws_resume_since500",
        *(f"rest_{d}_{w}" for d in ("before", "after") for w in ("start", "middle", "end")),
    ]
    for name in ("chat", "trivial"):
        result = data[name]
        assert result["messages"] == 5000
        for kind in kinds:
            assert result[kind]["n"] == 10, kind
            assert result[kind]["p99"] is not None, kind
        assert result["rest_page_cpu_us"]["servers"] > 0  # the server was metered


@pytest.mark.timeout(SCENARIO_TIMEOUT + 30)
def test_rest(fresh_database, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = run_bench("rest", fresh_database(), tmp_path)
    for name in ("chat", "trivial"):
        result = data[name]
        assert result["created"] > 0
        assert result["errors"] == {}
        assert result["latency_ms"]["p99"] is not None


@pytest.mark.timeout(SCENARIO_TIMEOUT + 30)
def test_fanout_with_reads_and_reactions(  # type: ignore[no-untyped-def]
    fresh_database, tmp_path: Path
) -> None:
    extra = ("--read-rate", "2", "--reaction-rate", "20", "--typing-users", "3")
    data = run_bench("fanout", fresh_database(), tmp_path, *extra)
    for name in ("chat", "trivial"):
        result = data[name]
        assert result["lost"] == result["duplicated"] == result["out_of_order"] == 0
        assert result["gaps"] == result["stream_behind"] == 0
        assert result["delivered"] == result["expected_deliveries"] > 0
        assert result["reads_sent"] > 0
        assert result["reactions_sent"] == result["reaction_items"] > 0
        assert result["reaction_noops"] == result["reactions_unanswered"] == 0
        per_receiver = result["reaction_items_per_receiver"]
        assert per_receiver["missing"] == 0
        assert per_receiver["min"] > 0
    # Every connection's user is a member: cursors move, small rooms get receipts.
    assert data["chat"]["receipts_received"] > 0
    assert data["trivial"]["receipts_received"] == 0
    # Typing: never answered by chat-service, heard by the others; the trivial server has no
    # typing and answers each with unknown_type, which the generator tolerates.
    chat, trivial = data["chat"], data["trivial"]
    assert chat["typing_users"] == trivial["typing_users"] == 6
    assert chat["typing_sent"] > 0 and chat["typing_rejected"] == 0
    assert chat["typing_frames_received"] > 0
    assert trivial["typing_rejected"] == trivial["typing_sent"] > 0
    assert trivial["typing_frames_received"] == 0
    assert chat["errors"] == trivial["errors"] == {}


@pytest.mark.timeout(SCENARIO_TIMEOUT + 30)
def test_roomlist(fresh_database, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = run_bench("roomlist", fresh_database(), tmp_path, "--only", "chat")
    result = data["chat"]
    assert "trivial" not in data
    assert result["messages"] == 20_000
    assert result["invariants_checked"] is True  # the seed keeps migration 0007's invariants
    assert result["read_state_mismatches"] == 0
    assert result["unread_total"] > result["big_room"]["unread"] > 0
    assert result["mentions_total"] >= result["big_room"]["mentions"] > 0
    for kind in ("room_list", "big_room_get"):
        assert result[kind]["n"] == 20
        assert result[kind]["p99"] is not None
    assert data["targets"]["GET /rooms?mine=true p99 ms"]["value"] is not None


@pytest.mark.timeout(SCENARIO_TIMEOUT + 30)
def test_resume(fresh_database, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = run_bench("resume", fresh_database(), tmp_path, "--only", "chat")
    result = data["chat"]
    assert result["missed"] == 100
    assert sum(result["mixed_kinds"].values()) == 100
    assert set(result["mixed_kinds"]) == {
        "reaction on", "reaction off", "edit", "delete", "member joined", "member left"
    }  # fmt: skip
    for kind in ("resume_texts", "resume_mixed"):
        assert result[kind]["n"] == 10
    assert result["mixed_over_texts"]["p50"] > 0


@pytest.mark.timeout(SCENARIO_TIMEOUT + 30)
def test_presence(fresh_database, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = run_bench("presence", fresh_database(), tmp_path, "--only", "chat")
    result = data["chat"]
    assert "trivial" not in data
    assert result["sockets"] == result["users"] == 40
    assert result["interval_s"] == 0.5
    arrive, reconnect = result["arrive"], result["reconnect"]
    for phase in (arrive, reconnect):
        assert phase["connects"] == 40, phase
        assert phase["connect_failures"] == phase["error_frames"] == {}, phase
        assert phase["servers_cpu_s"] > 0, phase
    # New users: every arrival is a change; frames come by the interval, not by the users.
    per_user = arrive["presence_frames_per_user"]
    assert 1 <= per_user["p50"] <= per_user["max"] <= arrive["presence_frames_bound"], arrive
    assert arrive["presence_frames_bound"] < 40
    assert arrive["ready_count"]["max"] > arrive["ready_count"]["min"] >= 1
    # A deploy: everyone reconnects within the grace, so nobody hears of any change.
    assert reconnect["presence_frames"] == 0, reconnect
    assert reconnect["ready_count"] == {"min": 40, "max": 40}, reconnect
    assert result["quiet"]["presence_frames"] == 0
    assert result["still_open"] == 40
