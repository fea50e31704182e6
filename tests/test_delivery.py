"""At least once, end to end: a worker killed with SIGKILL mid-run loses no read and
counts none twice (reads are acknowledged to the broker only after they are committed)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from ingest.broker import BrokerHandle, free_port
from ingest.clock import wall_ms
from ingest.config import Settings
from registry.db import open_database
from simulator.publisher import StationPublisher
from tests.helpers import FAULT_SCALE, serve_process, stored_counts

pytestmark = pytest.mark.broker

BATCHES = int(400 * FAULT_SCALE)  # 40,000 batches, 1,000,000 reads at full size
READS = 25


async def test_sigkill_mid_run_loses_nothing_and_repeats_nothing(broker: BrokerHandle,
                                                                 tmp_path: Path) -> None:
    if broker.kind != "mosquitto":
        # Measured: amqtt 0.12 loses the QoS 1 messages that were in flight to a killed
        # client (341 of 400 batches arrived). That is the embedded demo broker's limit,
        # not ours; production runs Mosquitto or EMQX, and CI has Mosquitto.
        msg = f"at-least-once across SIGKILL needs mosquitto; this session runs {broker.kind}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    uid = uuid.uuid4().hex[:8]
    db = f"sqlite+aiosqlite:///{tmp_path / 'bw.db'}"
    env = os.environ | broker.settings_overrides() | {
        "BIKEWATCH_DB_URL": db, "BIKEWATCH_MQTT_ROOT": f"k{uid}",
        "BIKEWATCH_CLIENT_ID": f"killed-{uid}", "BIKEWATCH_HTTP": f"127.0.0.1:{free_port()}",
        "BIKEWATCH_GROUP_MESSAGES": "20"}
    await (await open_database(db)).dispose()  # migrate once, before the workers start
    worker = serve_process(env)
    await asyncio.sleep(2.5)  # connected and subscribed: its persistent session exists
    settings = Settings.load(None, env)
    pub = StationPublisher(settings.mqtt_endpoint(), settings.mqtt_root, client_id=f"p-{uid}")
    pub.connect()
    rng = np.random.default_rng(1)
    kill_at = set(np.random.default_rng().choice(np.arange(50, BATCHES - 50), 2 + BATCHES // 4000,
                                                 replace=False).tolist())  # random moments
    t0 = wall_ms()
    kills = 0
    try:
        for i in range(BATCHES):
            tags = rng.integers(1, 2**40, READS, dtype=np.uint64)
            pub.reads(f"ST-{i % 7}", tags, np.full(READS, t0 + i, np.int64),
                      np.full(READS, -50, np.int8), t0)
            if i in kill_at:  # kill it while it is busy, then start it again
                await asyncio.to_thread(pub.flush, 10)
                worker.send_signal(signal.SIGKILL)
                worker.wait(10)
                kills += 1
                worker = serve_process(env)
        assert await asyncio.to_thread(pub.flush, 30)
        deadline = time.monotonic() + 60
        batches = reads = 0
        while time.monotonic() < deadline:
            batches, reads = await stored_counts(db)  # visits are folded in from the log
            if batches >= BATCHES and reads >= BATCHES * READS:  # within a second or so
                break
            await asyncio.sleep(0.5)
        print(f"sent {BATCHES} batches / {BATCHES * READS} reads, {kills} kills (after batches "
              f"{sorted(kill_at)}); "
              f"stored {batches} batches / {reads} reads")
        assert (batches, reads) == (BATCHES, BATCHES * READS)
    finally:
        pub.close()
        worker.terminate()
        worker.wait(15)
