"""A short simulated day against the real service through a real broker, scored against
its ground truth; and the `simulate` and `score` commands end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.broker import BrokerHandle
from registry.db import open_database
from simulator.day import Scenario
from simulator.run import Clerk, Fleet, Progress
from simulator.score import score
from simulator.session import Session, register
from simulator.town import Town
from simulator.truth import Truth
from tests.helpers import running_worker, settings_for

# 03:30 to 11:30 in 30 s: a night theft, its owner's report after 07:00, the fence
# moving the bike on after that; one outage, one clock a year ahead, bad payloads.
STATIONS, HOURS, SPEEDUP = 16, 8, 960.0
DAY = Scenario(theft_rate=1 / HOURS, outage_rate=24 / HOURS / STATIONS, skewed=1)
SEED = 19  # a power cut of 71 minutes; three passes after the report


async def test_a_short_simulated_day_scores_every_theft_alerted_and_no_false_alert(
        broker: BrokerHandle, sqlite_url: str, tmp_path: Path) -> None:
    settings = settings_for(broker, sqlite_url)
    town = Town(seed=SEED, stations=STATIONS, bikes=600)
    engine = await open_database(sqlite_url)
    try:
        await register(engine, town)
        async with running_worker(settings):
            fleet = Fleet(settings.mqtt_endpoint(), settings.mqtt_root, town.station_ids,
                          client_prefix=f"sim-{settings.mqtt_root.split('/')[0]}")
            session = Session(town, fleet, Clerk(engine, asyncio.get_running_loop()), DAY,
                              SPEEDUP, 0.02, int(3.5 * 3_600_000), Progress())
            (truth,) = await session.play(HOURS * 3600 / SPEEDUP, asyncio.Event())
            await asyncio.sleep(2)  # the last batches through the pipeline
            truth.write(tmp_path / "truth.json")
            result = await score(engine, Truth.read(tmp_path / "truth.json"))
    finally:
        await engine.dispose()
    print("\n".join(result.lines()))
    assert len(truth.thefts) == 1 and len({o.station for o in truth.outages}) == 1
    assert truth.skews and truth.bad and truth.sent_reads > 5_000
    assert result.expected_thefts == 1 and result.alerted_thefts == 1
    assert result.alerted_passes == result.expected_passes >= 2
    assert result.false_alerts == 0, result.false_detail
    assert result.outage_true_min > 10
    assert result.outage_error < 0.01
    assert result.bad_sent and result.bad_sent == result.bad_counted
    assert result.met


@pytest.mark.timeout(180)
def test_simulate_then_score_from_the_command_line(broker: BrokerHandle, sqlite_url: str,
                                                   tmp_path: Path) -> None:
    """`simulate --register --truth`, then `score`: a run with no worker scores as missed
    (exit 1), and the truth file and the score's JSON say why."""
    env = os.environ | broker.settings_overrides() | {
        "BIKEWATCH_DB_URL": sqlite_url, "BIKEWATCH_MQTT_ROOT": f"cli{tmp_path.name[-6:]}"}
    truth = tmp_path / "truth.json"
    run = subprocess.run(
        [sys.executable, "-m", "ingest.cli", "simulate", "--register", "--stations", "8",
         "--bikes", "300", "--speedup", "600", "--duration", "6", "--start", "07:00",
         "--theft-rate", "1", "--outage-rate", "0", "--truth", str(truth), "--seed", "3"],
        env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "ground truth" in run.stdout and "thefts staged" in run.stdout
    doc = Truth.read(truth)
    assert doc.sent_reads > 0 and doc.speedup == 600 and doc.thefts
    scored = subprocess.run([sys.executable, "-m", "ingest.cli", "score", "--truth", str(truth),
                             "--json"], env=env, capture_output=True, text=True, timeout=60)
    out = json.loads(scored.stdout)
    if out["expected_thefts"]:  # nobody was listening: nothing alerted
        assert scored.returncode == 1 and out["target_met"] is False
    assert out["alerts"] == 0 and out["false_alerts"] == 0
    bad = subprocess.run([sys.executable, "-m", "ingest.cli", "score", "--truth",
                          str(tmp_path / "missing.json")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "missing.json" in bad.stderr and "Traceback" not in bad.stderr
