"""At least once, end to end: a worker killed with SIGKILL mid-run loses no read and
counts none twice (reads are acknowledged to the broker only after they are committed),
and every staged theft is alerted once."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from ingest.broker import BrokerHandle
from ingest.clock import wall_ms
from registry.cases import report_theft
from registry.db import open_database
from registry.imports import import_stations, import_vehicles
from registry.models import Alert
from simulator.bench_workers import answering, metric_totals
from tests.conftest import unavailable
from tests.helpers import FAULT_SCALE, Police, accounted, fault_run, serve_process, stored_by_now

pytestmark = pytest.mark.broker

BATCHES = int(400 * FAULT_SCALE)  # 40,000 batches, 1,000,000 reads at full size
READS = 25


async def test_sigkill_mid_run_loses_nothing_and_repeats_nothing(broker: BrokerHandle,
                                                                 tmp_path: Path) -> None:
    if broker.kind != "mosquitto":
        # Measured: amqtt 0.12 loses the QoS 1 messages that were in flight to a killed
        # client (341 of 400 batches arrived). That is the embedded demo broker's limit,
        # not ours; production runs Mosquitto or EMQX, and CI has Mosquitto.
        unavailable(f"at-least-once across SIGKILL needs mosquitto; this session runs "
                    f"{broker.kind}")
    db = f"sqlite+aiosqlite:///{tmp_path / 'bw.db'}"
    run = await fault_run(broker.settings_overrides(), db, "killed", 1,
                          BIKEWATCH_GROUP_MESSAGES="20")
    rng = run.rng
    stolen = await _stage_thefts(db, rng)
    worker = serve_process(run.env)
    police = Police(run.settings, f"{run.settings.mqtt_root}/alerts/#")
    pub = run.pub
    moments = np.random.default_rng().choice(np.arange(50, BATCHES - 50),
                                             2 + BATCHES // 4000 + len(stolen), replace=False)
    kill_at = set(moments[len(stolen):].tolist())  # random moments
    seen_at = dict(zip(moments[:len(stolen)].tolist(), stolen, strict=True))
    kills = 0
    try:
        # Serving HTTP means connected; then subscribed, and its persistent session
        # exists. A fixed 2.5 s was once not enough on a cold fresh clone: nothing queued.
        assert await asyncio.to_thread(answering, [run.http], 60)
        await asyncio.sleep(1.0)
        pub.connect()
        t0 = wall_ms()
        for i in range(BATCHES):
            tags = rng.integers(1, 2**40, READS, dtype=np.uint64)
            if i in seen_at:  # a stolen bike passes: once, in one batch
                tags[0] = seen_at[i]
            pub.reads(f"ST-{i % 7}", tags, np.full(READS, t0 + i, np.int64),
                      np.full(READS, -50, np.int8), t0)
            if i in kill_at:  # kill it while it is busy, then start it again
                await asyncio.to_thread(pub.flush, 10)
                worker.send_signal(signal.SIGKILL)
                worker.wait(10)
                kills += 1
                worker = serve_process(run.env)
        assert await asyncio.to_thread(pub.flush, 30)
        sent_at = time.monotonic()
        batches, reads = await stored_by_now(db, BATCHES * READS)  # the last life's queue
        drained = time.monotonic()
        raised = await _raised(db)
        heard = {str(a["alert_id"]) for a in await police.wait_for(len(stolen), 30)}
        assert await asyncio.to_thread(answering, [run.http], 30)
        m = await asyncio.to_thread(metric_totals, [run.http], run.ops)  # the last life's counters
        print(f"sent {BATCHES} batches / {BATCHES * READS} reads and {len(stolen)} stolen "
              f"bikes passing, {kills} kills (after batches {sorted(kill_at)}); stored "
              f"{batches} batches / {reads} reads; alerts raised {len(raised)}, heard "
              f"{len(heard)} ({len(police.alerts) - len(heard)} repeats, dropped by id); "
              f"the last life drained its queue in {drained - sent_at:.0f} s; "
              f"last life: received {accounted(m)[0]:.0f} = {accounted(m)[1]:.0f} "
              f"stored + duplicate + rejected")
        assert (batches, reads) == (BATCHES, BATCHES * READS)
        assert sorted(tag for tag, _ in raised) == sorted(stolen)  # one alert per theft
        assert heard == {alert_id for _, alert_id in raised}
        assert accounted(m)[0] == accounted(m)[1]
    finally:
        police.close()
        pub.close()
        worker.terminate()
        worker.wait(15)


async def _stage_thefts(db: str, rng: np.random.Generator) -> list[int]:
    """Stations ST-0..ST-6 and ten registered bikes, each stolen an hour ago."""
    engine = await open_database(db)
    try:
        now = wall_ms()
        await import_stations(engine, "id,name,lat,lon,zone\n" + "".join(
            f"ST-{i},Road {i},28.{7200 + 30 * i},121.5400,kz\n" for i in range(7)), now)
        stolen = [int(t) for t in rng.integers(2**41, 2**42, 10, dtype=np.uint64)]
        await import_vehicles(engine, "tag,plate,owner_name,owner_phone,brand,color\n" + "".join(
            f"{t:x},ZJ-K{i:05d},Owner {i},1380000{i:04d},Yadea,white\n"
            for i, t in enumerate(stolen)))
        for i, t in enumerate(stolen):
            await report_theft(engine, t, f"K-{i}", now - 3_600_000, now)
        return stolen
    finally:
        await engine.dispose()


async def _raised(db: str) -> list[tuple[int, str]]:
    engine = await open_database(db)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(select(Alert.tag, Alert.alert_id)
                                      .where(Alert.kind == "stolen_sighting"))
            return [(int(r.tag), r.alert_id) for r in rows]
    finally:
        await engine.dispose()
