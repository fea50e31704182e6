"""Sightings past the retention are deleted, but those of bikes with an open case."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from registry import retention
from registry.cases import recover_theft, report_theft
from registry.imports import import_vehicles
from registry.models import Visit

DAY = 86_400_000
NOW = 1_763_803_800_000
VEHICLES = ("tag,plate,owner_name,owner_phone,brand,color\n"
            "000000a1,P1,,,B,C\n000000a2,P2,,,B,C\n000000a3,P3,,,B,C\n")


async def test_old_sightings_go_open_cases_stay(engine: AsyncEngine,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "CHUNK", 4)  # the walk crosses chunks
    await import_vehicles(engine, VEHICLES)
    await report_theft(engine, 0xA2, "OPEN", NOW - 300 * DAY, NOW)
    await report_theft(engine, 0xA3, "DONE", NOW - 300 * DAY, NOW)
    await recover_theft(engine, "DONE", NOW)
    rows = []
    for age_days in (300, 250, 200, 190, 100, 10):  # oldest first, as they were inserted
        for tag in (0xA1, 0xA2, 0xA3):
            first = NOW - age_days * DAY
            rows.append({"tag": tag, "station": "S", "first_ms": first,
                         "last_ms": first + 60_000, "reads": 3, "best_rssi": -50})
    async with engine.begin() as conn:
        await conn.execute(insert(Visit), rows)
    deleted = await retention.forget_sightings(engine, NOW - 180 * DAY)
    async with engine.connect() as conn:
        kept = {(r.tag, (NOW - r.first_ms) // DAY) for r in await conn.execute(
            select(Visit.tag, Visit.first_ms))}
    assert deleted == 8  # four old visits each of the innocent and the recovered bike
    assert kept == {(0xA2, d) for d in (300, 250, 200, 190, 100, 10)} | {
        (0xA1, 100), (0xA1, 10), (0xA3, 100), (0xA3, 10)}
    assert await retention.forget_sightings(engine, NOW - 180 * DAY) == 0
