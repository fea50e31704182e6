"""The live alert stream (Server-Sent Events): live alerts, zones, resuming with Last-Event-ID."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import numpy as np
import pytest

from ingest.broker import BrokerHandle
from ingest.clock import wall_ms
from tests.helpers import (
    STOLEN,
    bearer,
    publisher,
    running_worker,
    settings_for,
    stage_registry,
    until,
)

pytestmark = pytest.mark.broker


async def _listen(base: str, out: list[dict[str, Any]], token: dict[str, str], *,
                  params: dict[str, str] | None = None,
                  headers: dict[str, str] | None = None) -> None:
    """Read the stream like a browser's EventSource, appending each alert event."""
    async with httpx.AsyncClient(base_url=base, timeout=None, headers=token) as http, \
            http.stream("GET", "/api/v1/alerts/stream", params=params,
                        headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict[str, str] = {}
        async for line in response.aiter_lines():
            if not line:
                if event.get("event") == "alert":
                    out.append({"id": event["id"], "alert": json.loads(event["data"])})
                event = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                event[field] = value


def _sighting(pub: Any, station: str, t: int) -> None:
    pub.reads(station, np.array([STOLEN], np.uint64), np.array([t]), np.array([-50]), t)


async def test_live_alerts_zones_and_resuming(broker: BrokerHandle, sqlite_url: str) -> None:
    settings = settings_for(broker, sqlite_url)
    await stage_registry(sqlite_url)
    pub = publisher(settings)
    base = f"http://{settings.http}"
    shangpan: list[dict[str, Any]] = []
    xiaozhi: list[dict[str, Any]] = []
    police = await bearer(sqlite_url, "police")
    shangpan_only = await bearer(sqlite_url, "police", zones=["shangpan"])
    try:
        async with running_worker(settings) as worker:
            await until(lambda: len(worker.holder.current) == 1, 5)
            listeners = [asyncio.create_task(_listen(base, shangpan, shangpan_only)),
                         asyncio.create_task(_listen(base, xiaozhi, police,
                                                     params={"zone": "xiaozhi"}))]
            await asyncio.sleep(0.5)
            t = wall_ms()
            _sighting(pub, "SP-0040", t)
            assert await until(lambda: len(shangpan) == 1)
            first = shangpan[0]
            assert first["id"] == first["alert"]["alert_id"]
            assert first["alert"]["station"]["id"] == "SP-0040"
            for task in listeners:  # the browser tab closes
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            def raised() -> float:
                return worker.registry.get_sample_value(
                    "bikewatch_alerts_total", {"kind": "stolen_sighting"}) or 0

            _sighting(pub, "SP-0042", t + 90_000)  # raised while nobody listened
            await until(lambda: raised() == 2)
            await asyncio.sleep(0.01)  # raised in another millisecond: a definite order
            _sighting(pub, "SP-0050", t + 180_000)  # another zone
            await until(lambda: raised() == 3)
            resumed: list[dict[str, Any]] = []
            every: list[dict[str, Any]] = []
            listeners = [
                asyncio.create_task(_listen(base, resumed, police,
                                            headers={"last-event-id": first["id"]},
                                            params={"zone": "shangpan"})),
                asyncio.create_task(_listen(base, every, police, params={"after": first["id"]}))]
            assert await until(lambda: len(resumed) == 1 and len(every) == 2)
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(base_url=base, headers=police) as http:
                bad = await http.get("/api/v1/alerts/stream", params={"zone": "no zone!"})
                other = await http.get("/api/v1/alerts/stream", params={"zone": "xiaozhi"},
                                       headers=shangpan_only)
                ops = await http.get("/api/v1/alerts/stream",
                                     headers=await bearer(sqlite_url, "ops"))
        # the worker stopped with two streams open: they ended, it did not hang
        await asyncio.wait_for(asyncio.gather(*listeners, return_exceptions=True), 5)
    finally:
        pub.close()
    assert xiaozhi == []  # a patrol sees its own zones only
    assert [e["alert"]["station"]["id"] for e in resumed] == ["SP-0042"]
    assert [e["alert"]["update"] for e in resumed] == [2]
    assert [e["alert"]["station"]["id"] for e in every] == ["SP-0042", "SP-0050"]
    assert bad.status_code == 400
    assert (other.status_code, ops.status_code) == (403, 403)
