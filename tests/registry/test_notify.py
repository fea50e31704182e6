"""Registry changes reach every worker within a second: PostgreSQL notifications on
commit (and only on commit), and two workers on one database told of a change made
through the HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.broker import BrokerHandle
from registry.imports import bump_version
from registry.notify import listen
from tests.helpers import bearer, running_worker, settings_for, stage_registry, until


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_told_on_commit_never_on_rollback(engine: AsyncEngine) -> None:
    heard: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(listen(engine, lambda: heard.append(time.monotonic()), stop))
    assert await until(lambda: len(heard) == 1, 5)  # the wake-up on (re)connecting
    with contextlib.suppress(RuntimeError):
        async with engine.begin() as conn:
            await bump_version(conn)
            raise RuntimeError("rolled back")
    await asyncio.sleep(0.3)
    assert len(heard) == 1
    committed = time.monotonic()
    async with engine.begin() as conn:
        await bump_version(conn)
    assert await until(lambda: len(heard) == 2, 2)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert heard[1] - committed < 0.2


@pytest.mark.broker
async def test_two_workers_see_an_api_change_within_a_second(broker: BrokerHandle,
                                                             db_url: str) -> None:
    await stage_registry(db_url)  # one open case already
    first, second = settings_for(broker, db_url), settings_for(broker, db_url)
    clerk = await bearer(db_url, "clerk")
    async with running_worker(first) as one, running_worker(second) as two:
        assert await until(lambda: len(one.holder.current) == len(two.holder.current) == 1)
        async with httpx.AsyncClient(base_url=f"http://{first.http}", headers=clerk) as http:
            opened = await http.post("/api/v1/cases",
                                     json={"case_id": "LH-API-1", "tag": "00a1b2c4"})
            assert opened.status_code == 201, opened.text
            t0 = time.monotonic()
            assert await until(lambda: "LH-API-1" in two.holder.current.case_ids
                               and "LH-API-1" in one.holder.current.case_ids, 1.0)
            seen_s = time.monotonic() - t0
            await http.post("/api/v1/cases/LH-API-1/cancel", json={})
            assert await until(lambda: "LH-API-1" not in two.holder.current.case_ids, 1.0)
    print(f"case opened over the API reached both workers in {seen_s * 1000:.0f} ms")
