"""`bikewatch demo`, the main job, as a newcomer runs it: its own broker, SQLite, the
simulated town; within a minute a theft, its alert with a trajectory, and a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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


@pytest.mark.timeout(150)
def test_ctrl_c_in_a_terminal_stops_the_demo_in_order() -> None:
    """A terminal's Ctrl-C signals the whole process group: the demo's broker goes on
    until the worker has stopped, and the stations that were up count as up."""
    demo = subprocess.Popen([sys.executable, "-m", "ingest.cli", "demo"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # the group a terminal would signal
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            if line.startswith("API and /metrics"):
                break
        time.sleep(15)  # stations up, reads coming
        os.killpg(demo.pid, signal.SIGINT)
        out, err = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, err[-2000:]
    done = next(line for line in out.splitlines() if line.startswith("done:"))
    assert "stations online 100%" in done, done
    assert "disconnected from the broker" not in err and "not published" not in err, err[-2000:]
