"""Test helpers: a worker in the test's event loop, a police receiver, settings per test,
and the small staged town most end-to-end tests share."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from ingest.broker import BrokerHandle, free_port
from ingest.clock import wall_ms
from ingest.config import Settings
from ingest.service import Worker
from registry.cases import report_theft
from registry.db import open_database
from registry.imports import import_stations, import_vehicles
from registry.models import SeenBatch, Visit
from registry.tokens import create_token
from simulator.publisher import StationPublisher

# Fault tests' traffic multiplier: 1 in CI, 100 for the full size (tests/test_faults.py).
FAULT_SCALE = float(os.environ.get("BIKEWATCH_FAULT_SCALE", "1"))


def settings_for(broker: BrokerHandle, db_url: str, **extra: str) -> Settings:
    """Settings with a topic root, client id and HTTP port of this test's own."""
    uid = uuid.uuid4().hex[:8]
    env = broker.settings_overrides() | {
        "BIKEWATCH_DB_URL": db_url, "BIKEWATCH_MQTT_ROOT": f"t{uid}/town",
        "BIKEWATCH_CLIENT_ID": f"worker-{uid}", "BIKEWATCH_HTTP": f"127.0.0.1:{free_port()}",
    } | extra
    return Settings.load(None, env)


async def bearer(db_url: str, role: str, zones: list[str] | None = None,
                 name: str | None = None) -> dict[str, str]:
    """HTTP headers with a new token of `role` (limited to `zones`)."""
    engine = await open_database(db_url)
    try:
        secret = await create_token(engine, role, name or f"{role}-{uuid.uuid4().hex[:8]}",
                                    wall_ms(), zones)
    finally:
        await engine.dispose()
    return {"authorization": f"Bearer {secret}"}


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    engine = await open_database(settings.db_url)
    worker = Worker(settings, engine)
    task = asyncio.create_task(worker.run(), name="worker-under-test")
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        await task  # raises what stopped it
    try:
        yield worker
    finally:
        worker.stop.set()
        await asyncio.wait_for(task, 15)
        await engine.dispose()


class Police:
    """A police integration: subscribes to alert topics and keeps what arrives."""

    def __init__(self, settings: Settings, topic: str) -> None:
        ep = settings.mqtt_endpoint()
        self.alerts: list[dict[str, object]] = []
        self.topics: list[str] = []
        self._lock = threading.Lock()
        self.subscription = topic
        self.stray: list[str] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"police-{uuid.uuid4().hex[:8]}")
        ep.secure(self.client)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect(ep.host, ep.port)
        self.client.loop_start()
        assert subscribed.wait(10), "police subscriber did not subscribe"

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        # As an integration should: keep what it subscribed to, set aside the rest. amqtt
        # 0.12 was seen sending a station's retained `online` to a `{root}/alerts/...`
        # subscriber; a receiver that raised on it lost its network thread, and amqtt
        # then stalled on the dead connection, failing every later test.
        if not paho.topic_matches_sub(self.subscription, msg.topic):
            self.stray.append(msg.topic)
            return
        with self._lock:
            self.alerts.append(orjson.loads(msg.payload))
            self.topics.append(msg.topic)

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.alerts) < n:
            await asyncio.sleep(0.02)
        with self._lock:
            return list(self.alerts)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def metric(worker: Worker, name: str, **labels: str) -> float | None:
    """One sample of the worker's `/metrics` text, read with Prometheus's own parser."""
    for family in text_string_to_metric_families(worker.metrics_text().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def totals(worker: Worker) -> dict[str, float]:
    """Every sample of an in-process worker's `/metrics`, summed by name over labels (as
    simulator.bench_workers.metric_totals does for workers in processes of their own)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(worker.metrics_text().decode()):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def publisher(settings: Settings) -> StationPublisher:
    pub = StationPublisher(settings.mqtt_endpoint(), settings.mqtt_root,
                           client_id=f"station-{uuid.uuid4().hex[:8]}")
    pub.connect()
    return pub


async def until(predicate: object, timeout: float = 10.0) -> bool:
    """True once `predicate()` is (awaited, where it returns an awaitable); False at the
    timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ok = predicate()  # type: ignore[operator]
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return True
        await asyncio.sleep(0.02)
    return False


STATIONS = """id,name,lat,lon,zone
SP-0040,Harbour Rd / 2nd St,28.7200,121.5400,shangpan
SP-0042,Harbour Rd / 3rd St,28.7300,121.5500,shangpan
SP-0050,Hill Rd,28.7400,121.5600,xiaozhi
"""
VEHICLES = """tag,plate,owner_name,owner_phone,brand,color
00a1b2c3,ZJ-J12345,Li Lei,13800001234,Yadea,white
00a1b2c4,ZJ-J12346,Han Meimei,13900001234,Niu,black
"""
STOLEN = 0xA1B2C3
INNOCENT = 0xA1B2C4


def serve_process(env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    """`bikewatch serve` in a process of its own (for tests that kill it, or measure it);
    its output discarded."""
    return subprocess.Popen([sys.executable, "-m", "ingest.cli", "serve", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class FaultRun:
    """One fault test's `bikewatch serve` environment (a topic root, client id and HTTP
    port of its own), an ops token for its /metrics, and a station publisher."""

    env: dict[str, str]
    http: int
    ops: dict[str, str]
    settings: Settings
    pub: StationPublisher
    rng: np.random.Generator
    t0: int = field(default_factory=wall_ms)
    sent: int = 0  # batches

    def send(self, count: int, reads: int = 25) -> None:
        """`count` batches of `reads` random tags from stations ST-0..ST-6, flushed."""
        for _ in range(count):
            self.pub.reads(f"ST-{self.sent % 7}",
                           self.rng.integers(1, 2**40, reads, dtype=np.uint64),
                           np.full(reads, self.t0 + self.sent, np.int64),
                           np.full(reads, -50, np.int8), self.t0)
            self.sent += 1
        assert self.pub.flush(60)


async def fault_run(mqtt: dict[str, str], db_url: str, name: str, seed: int,
                    **extra: str) -> FaultRun:
    """The database migrated once, before any worker starts; the publisher not yet
    connected (connect it once the worker has subscribed)."""
    uid = uuid.uuid4().hex[:8]
    http = free_port()
    env = os.environ | mqtt | {
        "BIKEWATCH_DB_URL": db_url, "BIKEWATCH_MQTT_ROOT": f"{name}{uid}",
        "BIKEWATCH_CLIENT_ID": f"{name}-{uid}", "BIKEWATCH_HTTP": f"127.0.0.1:{http}",
    } | extra
    await (await open_database(db_url)).dispose()
    ops = await bearer(db_url, "ops")
    settings = Settings.load(None, env)
    pub = StationPublisher(settings.mqtt_endpoint(), settings.mqtt_root, client_id=f"p-{uid}")
    return FaultRun(env, http, ops, settings, pub, np.random.default_rng(seed))


async def stored_by_now(url: str, reads: int, stall_s: float = 60.0) -> tuple[int, int]:
    """`stored_counts` once `reads` reads are stored, or once nothing more has come for
    `stall_s` seconds (the caller's assertion then says what is missing). Visits are
    folded in from the log after their batches commit, and a worker may start with
    tens of thousands of batches queued: wait while it makes progress."""
    last = (-1, -1)
    deadline = time.monotonic() + stall_s
    while True:
        counts = await stored_counts(url)
        if counts[1] >= reads or time.monotonic() > deadline:
            return counts
        if counts != last:
            last, deadline = counts, time.monotonic() + stall_s
        await asyncio.sleep(0.5)


def accounted(m: dict[str, float]) -> tuple[float, float]:
    """(received, accepted + duplicate + rejected) from one worker's metrics: every
    fault test checks that the two are equal."""
    return (m.get("bikewatch_received_batches_total", 0),
            m.get("bikewatch_batches_total", 0) + m.get("bikewatch_duplicate_batches_total", 0)
            + m.get("bikewatch_rejected_total", 0))


async def stored_counts(url: str) -> tuple[int, int]:
    """Batches taken (their dedupe keys) and reads stored (in visits) so far."""
    engine = await open_database(url)
    try:
        async with engine.connect() as conn:
            batches = (await conn.execute(select(func.count()).select_from(SeenBatch))).scalar()
            reads = (await conn.execute(select(func.coalesce(func.sum(Visit.reads), 0)))).scalar()
        return int(batches or 0), int(reads or 0)
    finally:
        await engine.dispose()


async def stage_registry(db_url: str) -> None:
    """Three stations in two zones, two bikes, one of them stolen an hour ago."""
    engine = await open_database(db_url)
    await import_stations(engine, STATIONS, wall_ms())
    await import_vehicles(engine, VEHICLES)
    await report_theft(engine, STOLEN, "LH-2026-0042", wall_ms() - 3_600_000, wall_ms())
    await engine.dispose()


@contextlib.asynccontextmanager
async def town(broker: BrokerHandle, db_url: str, alerts: str | None, topic: str = "alerts",
                **extra: str) -> AsyncIterator[tuple[Settings, Worker, Police, StationPublisher]]:
    """The registry of `stage_registry`, a running worker, a station publisher, and a
    police receiver on `{root}/{topic}/{alerts}` (all zones when None)."""
    settings = settings_for(broker, db_url, **extra)
    await stage_registry(db_url)
    # Zones are one topic level, so `+` is every zone; amqtt 0.12 also sends `#`
    # subscribers retained messages of other topics under the root (seen: a station's
    # `online` status on `{root}/alerts/#`).
    police = Police(settings, f"{settings.mqtt_root}/{topic}/{alerts or '+'}")
    pub = publisher(settings)
    try:
        async with running_worker(settings) as worker:
            yield settings, worker, police, pub
    finally:
        pub.close()
        police.close()
