"""Raising a stolen_sighting alert in the group's transaction (alerts.engine), on SQLite
and PostgreSQL: once per visit, counted once, and with the vehicle as the registry has it."""

from __future__ import annotations

import orjson
import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.engine import RaisedAlert, Sighting, Vehicles, raise_alert
from ingest.clock import wall_ms
from registry.cases import recover_theft, report_theft
from registry.imports import import_stations, import_vehicles
from registry.models import Alert, TheftCase, Visit
from registry.records import update_vehicle
from registry.snapshot import registry_version
from registry.stations import load_directory
from registry.tags import to_db
from tests.helpers import STATIONS, STOLEN, VEHICLES

CASE = "LH-2026-0042"


async def _staged(engine: AsyncEngine) -> int:
    """The helpers' town, the stolen bike seen at SP-0040 since the theft; the visit's
    first_ms."""
    now = wall_ms()
    await import_stations(engine, STATIONS, now)
    await import_vehicles(engine, VEHICLES)
    await report_theft(engine, STOLEN, CASE, now - 3_600_000, now)
    async with engine.begin() as conn:
        await conn.execute(insert(Visit).values(tag=to_db(STOLEN), station="SP-0040",
                                                first_ms=now - 60_000, last_ms=now - 50_000,
                                                reads=3, best_rssi=-50))
    return now - 60_000


async def _raise(engine: AsyncEngine, first_ms: int, vehicles: Vehicles,
                 station: str = "SP-0040") -> RaisedAlert | None:
    now = wall_ms()
    async with engine.begin() as conn:
        vehicles.at_version(await registry_version(conn))
        directory = await load_directory(conn)
        return await conn.run_sync(raise_alert, Sighting(CASE, STOLEN, station, first_ms,
                                                         now - 3_600_000, now), directory,
                                   now, 300_000, vehicles)


async def _updates(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(TheftCase.updates)
                                       .where(TheftCase.case_id == CASE))).scalar_one())


async def test_a_visit_raised_again_raises_nothing_and_counts_once(engine: AsyncEngine) -> None:
    first_ms = await _staged(engine)
    alert = await _raise(engine, first_ms, Vehicles())
    assert alert is not None
    doc = orjson.loads(alert.payload)
    assert (doc["update"], doc["station"]["id"], doc["seen_ms"]) == (1, "SP-0040", first_ms)
    # A second worker, or this one after a restart, with nothing in memory: the alert's
    # unique key refuses it, and the case's count is given back.
    assert await _raise(engine, first_ms, Vehicles()) is None
    assert await _updates(engine) == 1
    async with engine.connect() as conn:
        stored = (await conn.execute(select(Alert.alert_id, Alert.update_no, Alert.payload)))
        rows = stored.all()
    assert [(r.alert_id, r.update_no) for r in rows] == [(alert.alert_id, 1)]
    assert orjson.loads(rows[0].payload) == doc  # stored whole in the one INSERT


async def test_a_closed_case_raises_nothing(engine: AsyncEngine) -> None:
    first_ms = await _staged(engine)
    await recover_theft(engine, CASE, wall_ms())
    assert await _raise(engine, first_ms, Vehicles()) is None
    async with engine.connect() as conn:
        assert (await conn.execute(select(Alert.alert_id))).first() is None


async def test_a_vehicle_changed_is_shown_from_the_next_registry_version(
        engine: AsyncEngine) -> None:
    first_ms = await _staged(engine)
    vehicles = Vehicles()
    before = await _raise(engine, first_ms, vehicles)
    assert await update_vehicle(engine, STOLEN, {"color": "red"}, None)
    after = await _raise(engine, first_ms + 120_000, vehicles, "SP-0042")
    assert before is not None and after is not None
    assert orjson.loads(before.payload)["vehicle"]["color"] == "white"
    assert orjson.loads(after.payload)["vehicle"]["color"] == "red"


class _NoTrips:
    """A connection that fails any statement: what `Vehicles.get` finds must be held."""

    def execute(self, *_: object) -> None:
        raise AssertionError("a trip to the database")


async def test_cards_loaded_for_the_open_cases_need_no_trip(engine: AsyncEngine) -> None:
    await _staged(engine)
    vehicles = Vehicles()
    unknown = 0xFEED0001
    async with engine.connect() as conn:
        version = await registry_version(conn)
        await vehicles.load(conn, version, [STOLEN, unknown])
    vehicle, owner = vehicles.get(_NoTrips(), STOLEN)  # type: ignore[arg-type]
    assert vehicle is not None and vehicle["plate"] and owner is not None
    assert vehicles.get(_NoTrips(), unknown) == (None, None)  # type: ignore[arg-type]
    # The same cards as one fetched alone.
    async with engine.connect() as conn:
        assert await conn.run_sync(Vehicles().get, STOLEN) == (vehicle, owner)
    # A new registry version forgets them.
    vehicles.at_version(version + 1)
    with pytest.raises(AssertionError, match="a trip"):
        vehicles.get(_NoTrips(), STOLEN)  # type: ignore[arg-type]


async def test_the_refresher_loads_the_cards_of_the_open_cases(engine: AsyncEngine) -> None:
    from ingest.config import Settings
    from ingest.service import Worker

    await _staged(engine)
    worker = Worker(Settings.load(None, {}), engine)
    await worker._refresh()
    vehicle, _ = worker.pipeline.vehicles.get(_NoTrips(), STOLEN)  # type: ignore[arg-type]
    assert vehicle is not None
