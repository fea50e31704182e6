"""Two workers on one database (PostgreSQL: an advisory lock; SQLite: a file lock):
both track every station (same /metrics), one stores the transitions and tells
operators, each change once; when it stops, the other takes over and the record
goes on without a gap."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest
from sqlalchemy import func, select

from ingest.broker import BrokerHandle, free_port
from ingest.service import Worker
from registry.db import open_database
from registry.models import StationTransition
from tests.helpers import (
    Police,
    metric,
    publisher,
    running_worker,
    settings_for,
    stage_registry,
    until,
)

pytestmark = [pytest.mark.broker]


async def _stored(db_url: str, station: str) -> list[tuple[bool, str]]:
    engine = await open_database(db_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(select(StationTransition.up, StationTransition.cause)
                                      .where(StationTransition.station == station)
                                      .order_by(StationTransition.id))
            return [(bool(r.up), r.cause) for r in rows]
    finally:
        await engine.dispose()


def _up(worker: Worker) -> float | None:
    return metric(worker, "bikewatch_station_up", station="SP-0040", zone="shangpan")


@pytest.mark.parametrize("db_url", ["sqlite",
                                    pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
async def test_one_worker_stores_health_and_another_takes_over(broker: BrokerHandle,
                                                               db_url: str) -> None:
    await stage_registry(db_url)
    first = settings_for(broker, db_url)
    second = dataclasses.replace(first, client_id=first.client_id + "-b",
                                 http=f"127.0.0.1:{free_port()}")
    ops = Police(first, f"{first.mqtt_root}/health/+")
    pub = publisher(first)
    stacks = [contextlib.AsyncExitStack(), contextlib.AsyncExitStack()]
    try:
        workers = [await stacks[0].enter_async_context(running_worker(first)),
                   await stacks[1].enter_async_context(running_worker(second))]
        assert await until(lambda: sum(w.health_lease.held for w in workers) == 1, 10)
        owner = next(i for i, w in enumerate(workers) if w.health_lease.held)
        for status, up in (("online", 1), ("offline", 0), ("online", 1)):
            pub.status("SP-0040", status)
            assert await until(lambda up=up: all(_up(w) == up for w in workers))
        assert await until(lambda: len([e for e in ops.alerts
                                        if e["station"] == "SP-0040"]) >= 3)
        await asyncio.sleep(1.5)  # a second worker's copies would have landed by now
        stored = await _stored(db_url, "SP-0040")
        assert stored == [(False, "never"), (True, "online"), (False, "offline"),
                          (True, "online")]
        told = [e["event"] for e in ops.alerts if e["station"] == "SP-0040"]
        assert told == ["up", "down", "up"]
        assert [metric(w, "bikewatch_health_owner") for w in workers] == [
            float(i == owner) for i in range(2)]
        # the owner stops; the other takes the lease and goes on recording
        await stacks[owner].aclose()
        heir = workers[1 - owner]
        assert await until(lambda: heir.health_lease.held, 10)
        pub.status("SP-0040", "offline")
        assert await until(lambda: _up(heir) == 0)
        await asyncio.sleep(1.5)
        assert (await _stored(db_url, "SP-0040"))[4:] == [(False, "offline")]
    finally:
        for stack in stacks:
            await stack.aclose()
        pub.close()
        ops.close()
    engine = await open_database(db_url)
    async with engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(StationTransition))
                 ).scalar_one()
    await engine.dispose()
    assert total == 3 + 4  # three stations provisioned, SP-0040's four changes
