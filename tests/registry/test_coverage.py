"""Registration coverage per community, against hand-counted figures."""

from __future__ import annotations

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.reports import coverage_csv, coverage_json, coverage_table
from registry.coverage import coverage_report
from registry.imports import import_stations, import_vehicles
from registry.models import Visit

DAY = 86_400_000
NOW = 1_763_803_800_000
STATIONS = ("id,name,lat,lon,zone,community\nE1,,,,z,east\nE2,,,,z,east\nW1,,,,z,west\n"
            "X1,,,,z,\n")
VEHICLES = ("tag,plate,owner_name,owner_phone,brand,color,community\n"
            "a1,,,,,,east\na2,,,,,,east\na3,,,,,,east\nb1,,,,,,west\nc1,,,,,,\n")


def _visit(tag: int, station: str, days_ago: float) -> dict[str, object]:
    t = NOW - int(days_ago * DAY)
    return {"tag": tag, "station": station, "first_ms": t, "last_ms": t + 1000, "reads": 1,
            "best_rssi": -60}


async def test_registered_heard_and_unknown_tags(engine: AsyncEngine) -> None:
    await import_stations(engine, STATIONS, NOW)
    await import_vehicles(engine, VEHICLES)
    async with engine.begin() as conn:
        await conn.execute(insert(Visit), [
            _visit(0xA1, "E1", 1), _visit(0xA1, "W1", 2),  # heard twice: counted once
            _visit(0xA2, "W1", 3),                         # an east bike heard in the west
            _visit(0xA3, "E1", 40),                        # too long ago
            _visit(0xB1, "E2", 29),
            _visit(0xF1, "E1", 1), _visit(0xF1, "W1", 1),  # unknown, heard in both
            _visit(0xF2, "E2", 5), _visit(0xF3, "X1", 2),  # unknown
            _visit(0xF4, "E1", 31),                        # unknown, too long ago
        ])
    c = await coverage_report(engine, NOW - 30 * DAY, NOW)
    rows = {r.community: (r.registered, r.heard, r.unknown_tags) for r in c.communities}
    assert rows == {"east": (3, 2, 2), "west": (1, 1, 1), "(none)": (1, 0, 1)}
    assert (c.registered, c.heard, c.unknown_tags) == (5, 3, 3)
    doc = coverage_json(c)
    assert doc["town"]["heard_ratio"] == 0.6
    assert coverage_csv(c).splitlines()[1] == "(none),1,0,0.000000,1"
    assert "3 unknown tags heard" in coverage_table(c)
