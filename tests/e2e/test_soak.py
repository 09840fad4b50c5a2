"""The soak (``benchmarks/soak.py``) at CI size: two servers, one fault of each kind at least,
then an audit proving that every acknowledged message reached every client exactly once, in
order, and is in the database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_under_faults_loses_and_duplicates_nothing(fresh_database, tmp_path):
    report_path = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    command = [sys.executable, "-m", "benchmarks.soak", "--ci", "--json", str(report_path)]
    result = subprocess.run(
        [*command, "--database-url", fresh_database()],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, output
    report = json.loads(report_path.read_text())
    assert report["acked"] > 0, output
    assert report["lost"] == 0, output
    assert report["duplicates"] == 0, output
    assert report["out_of_order"] == 0, output
    assert report["gaps"] == 0, output
    assert report["db_missing"] == 0, output
    assert report["violations"] == {}, output
    kinds = ("kill", "term", "listen", "slow")
    assert all(report["faults"][kind] >= 1 for kind in kinds), report["fault_log"]
