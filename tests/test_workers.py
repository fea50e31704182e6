"""`bikewatch serve --workers 2` on one PostgreSQL: the broker splits the stations'
batches between the two (shared subscription), a stolen bike seen at stations whose
batches land on different workers is alerted once per visit, and a worker killed with
SIGKILL mid-run is started again by the supervisor with no read lost or stored twice."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import psutil
import pytest

from ingest.broker import BrokerHandle, free_port
from ingest.config import Settings
from registry.db import open_database
from simulator.bench_workers import answering, metric_totals
from simulator.day import Scenario
from simulator.run import Clerk, Fleet, Progress
from simulator.score import score
from simulator.session import Session, register
from simulator.town import Town
from tests.conftest import unavailable
from tests.helpers import accounted, bearer, serve_process, stored_by_now

pytestmark = pytest.mark.broker
SPEEDUP, SECONDS = 600.0, 24.0  # four simulated hours of the morning


@pytest.mark.timeout(240)
@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
async def test_two_workers_split_the_load_and_one_killed_loses_nothing(
        broker: BrokerHandle, db_url: str, tmp_path: Path) -> None:
    if broker.kind != "mosquitto":  # amqtt 0.12 loses QoS 1 messages in flight to a killed client
        unavailable(f"several workers with SIGKILL need mosquitto; this is {broker.kind}")
    uid = uuid.uuid4().hex[:8]
    port = free_port(2)
    env = os.environ | broker.settings_overrides() | {
        "BIKEWATCH_DB_URL": db_url, "BIKEWATCH_MQTT_ROOT": f"w{uid}",
        "BIKEWATCH_CLIENT_ID": f"pair-{uid}", "BIKEWATCH_HTTP": f"127.0.0.1:{port}",
        "BIKEWATCH_GROUP_MESSAGES": "20"}
    settings = Settings.load(None, env)
    town = Town(seed=5, stations=24, bikes=1_000)
    engine = await open_database(db_url)
    await register(engine, town)
    ops = await bearer(db_url, "ops")
    supervisor = await asyncio.to_thread(serve_process, env, "--workers", "2")
    try:
        assert await asyncio.to_thread(answering, [port, port + 1], 30)
        await asyncio.sleep(1.5)  # subscribed
        first = {c.pid for c in psutil.Process(supervisor.pid).children()}
        assert len(first) == 2
        fleet = Fleet(settings.mqtt_endpoint(), settings.mqtt_root, town.station_ids,
                      client_prefix=f"st-{uid}")
        session = Session(town, fleet, Clerk(engine, asyncio.get_running_loop()),
                          Scenario(theft_rate=1.0, outage_rate=0, skewed=0, quick_reports=True,
                                   night_share=0),
                          SPEEDUP, 0.0, 7 * 3_600_000, Progress())
        play = asyncio.create_task(session.play(SECONDS, asyncio.Event()))
        await asyncio.sleep(SECONDS / 2)
        split = [(await asyncio.to_thread(metric_totals, [p], ops)).get(
            "bikewatch_received_batches_total", 0) for p in (port, port + 1)]
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        (truth,) = await play
        batches, reads = await stored_by_now(db_url, truth.sent_reads)
        await asyncio.sleep(2)  # the last alerts
        result = await score(engine, truth)
        m = await asyncio.to_thread(metric_totals, [port, port + 1], ops)  # both, as they are
        print(f"sent {truth.sent_batches} batches / {truth.sent_reads} reads; batches taken "
              f"by the workers at half time {split}; one SIGKILLed; stored {batches} batches /"
              f" {reads} reads; received {accounted(m)[0]:.0f} = {accounted(m)[1]:.0f} "
              f"stored + duplicate + rejected\n" + "\n".join(result.lines()))
        assert accounted(m)[0] == accounted(m)[1]
        assert all(n > 0 for n in split), split
        assert (batches, reads) == (truth.sent_batches, truth.sent_reads)
        assert result.expected_thefts >= 2 and result.met, result.false_detail
        assert result.alerted_passes == result.expected_passes
        now = {c.pid for c in psutil.Process(supervisor.pid).children()}
        assert len(now) == 2 and victim not in now  # started again
    finally:
        await engine.dispose()
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(45) == 0
