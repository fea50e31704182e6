"""`bikewatch demo`, the main job, as a newcomer runs it: its own broker, SQLite, the
simulated town; within a minute a theft, its alert with a trajectory, and a clean stop."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(150)
def test_the_demo_raises_an_alert_within_a_minute_and_stops_cleanly() -> None:
    run = subprocess.run([sys.executable, "-m", "ingest.cli", "demo", "--duration", "60"],
                         capture_output=True, text=True, timeout=140)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "registry: stations: 24 added" in out and "vehicles: 2000 added" in out
    assert "tokens: ops bw_" in out and "police bw_" in out
    assert "stolen_sighting case SIM-" in out and "path SP-" in out
    done = next(line for line in out.splitlines() if line.startswith("done:"))
    reads = int(done.split()[1])
    alerts = int(done.split(",")[1].split()[0])
    assert reads > 100 and alerts >= 1, done
    assert "Traceback" not in run.stderr
