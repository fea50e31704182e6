"""The registry's records: owners, communities, the optional columns, search keys and
masks, on SQLite and PostgreSQL."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.db import open_database
from registry.errors import Invalid
from registry.imports import import_stations, import_vehicles
from registry.models import Community, Owner, Station, TheftCase, Vehicle, Zone
from registry.normalize import mask_id_number, mask_phone, phone_key, plate_key

NOW = 1_763_803_800_000
FULL = ("tag,plate,owner_name,owner_phone,brand,color,frame_no,model,registered_at,community,"
        "owner_id_number\n00a1b2c3,ZJ-J12345,Li Lei,138 0000 1234,Yadea,white,LYD-2025-O1,G5,"
        "2025-03-01T09:00,east-1,330102199001011234\n") + """\
00a1b2c4,ZJ-J12346,Li Lei,13800001234,Niu,black,,,,east-1,330102199001011234
00a1b2c5,ZJ-J2,Han Meimei,139 0000 5678,Niu,red,,,,west-2,
00a1b2c6,ZJ-J3,Han Meimei,139 0000 5678,Niu,red,,,,,
00a1b2c7,ZJ-J4,,,Niu,red,,,not a time,,
"""


async def _all(engine: AsyncEngine, stmt: object) -> list[object]:
    async with engine.connect() as conn:
        return list((await conn.execute(stmt)).all())


class TestVehicleImport:
    async def test_owners_communities_and_optional_columns(self, engine: AsyncEngine) -> None:
        report = await import_vehicles(engine, FULL)
        assert (report.added, [line for line, _ in report.errors]) == (4, [6])
        assert "registered_at" in report.errors[0][1]
        owners = await _all(engine, select(Owner.name, Owner.phone_key, Owner.id_number)
                            .order_by(Owner.id))
        # one owner by ID number for two bikes, one by name and phone for two more
        assert [tuple(o) for o in owners] == [
            ("Li Lei", "13800001234", "330102199001011234"),
            ("Han Meimei", "13900005678", "")]
        rows = {v.tag: v for v in await _all(engine, select(Vehicle))}
        first = rows[0x00A1B2C3]
        assert (first.frame_key, first.model, first.community) == ("1YD202501", "G5", "east-1")
        assert first.registered_ms == 1_740_819_600_000
        assert rows[0x00A1B2C6].community is None
        assert {c.id for c in await _all(engine, select(Community.id))} == {
            "east-1", "west-2"}
        again = await import_vehicles(engine, FULL)
        assert (again.added, again.updated, again.unchanged) == (0, 0, 4)
        # the owner with that ID number changed phone: one owner updated, bikes unchanged
        moved = await import_vehicles(engine, FULL.replace("138 0000 1234", "13900009999")
                                      .replace("13800001234", "13900009999"))
        assert (moved.updated, moved.unchanged) == (0, 4)
        phones = await _all(engine, select(Owner.phone_key).order_by(Owner.id))
        assert [p[0] for p in phones] == ["13900009999", "13900005678"]

    async def test_contract_columns_alone_leave_the_rest(self, engine: AsyncEngine) -> None:
        await import_vehicles(engine, FULL)
        plain = ("tag,plate,owner_name,owner_phone,brand,color\n"
                 "00a1b2c3,ZJ-J12345,Li Lei,138 0000 1234,Yadea,white\n")
        report = await import_vehicles(engine, plain)
        assert report.unchanged == 1  # the owner is found by name and phone
        row = (await _all(engine, select(Vehicle.frame_no, Vehicle.community)
                          .where(Vehicle.tag == 0x00A1B2C3)))[0]
        assert tuple(row) == ("LYD-2025-O1", "east-1")


class TestStationImport:
    async def test_zones_communities_installed(self, engine: AsyncEngine) -> None:
        text = ("id,name,lat,lon,zone,community,installed_at\n"
                "SP-1,A,28.7,121.5,shangpan,east-1,2025-01-01T00:00Z\nSP-2,B,,,xiaozhi,,\n")
        assert (await import_stations(engine, text, NOW)).added == 2
        zones = {z[0] for z in await _all(engine, select(Zone.id))}
        assert zones == {"shangpan", "xiaozhi"}
        sp1 = (await _all(engine, select(Station.community, Station.installed_ms)
                          .where(Station.id == "SP-1")))[0]
        assert tuple(sp1) == ("east-1", 1_735_689_600_000)


class TestDatabaseConstraints:
    """The database refuses what the code would too: not only Python checks."""

    async def test_status_coordinates_owner_id_number(self, engine: AsyncEngine) -> None:
        await import_vehicles(engine, FULL)
        for stmt in (
            TheftCase.__table__.insert().values(case_id="C1", tag=0x00A1B2C3,
                                                status="lost", stolen_ms=0, reported_ms=0),
            Station.__table__.insert().values(id="X", lat=91.0, lon=0.0),
            Owner.__table__.insert().values(name="x", phone="", phone_key="",
                                            id_number="330102199001011234"),
            Vehicle.__table__.insert().values(tag=1, community="nowhere"),
        ):
            with pytest.raises(IntegrityError):
                async with engine.begin() as conn:
                    await conn.execute(stmt)


PLATE_CHARS = st.text(alphabet=string.ascii_letters + string.digits + " -.浙沪", max_size=20)


class TestKeysAndMasks:
    @given(PLATE_CHARS)
    def test_plate_key_is_stable_and_ignores_separators(self, plate: str) -> None:
        key = plate_key(plate)
        assert plate_key(key) == key
        assert plate_key(plate.lower().replace("-", " ")) == key
        assert not set(key) & set("OQILZSB -.")

    def test_look_alikes_match(self) -> None:
        assert plate_key("zj-j 12345") == plate_key("ZJJ I2345") == plate_key("2JJ12345")
        assert plate_key("浙A·0B8S") == plate_key("浙AO885")

    @given(st.text(alphabet="0123456789 +-", max_size=24))
    def test_a_mask_shows_at_most_seven_digits(self, phone: str) -> None:
        masked = mask_phone(phone)
        assert sum(c.isdigit() for c in masked) <= 7
        assert len(masked) == len(phone_key(phone))

    def test_masks(self) -> None:
        assert mask_phone("+86 138-0000-1234") == "138****1234"
        assert mask_id_number("330102199001011234") == "3301**********1234"


class TestAnyText:
    @given(st.text(max_size=300) | st.sampled_from([
        "tag,plate,owner_name,owner_phone,brand,color\n\r\x00,\"\n",
        "tag,plate,owner_name,owner_phone,brand,color\n" + "x," * 5000 + "\n",
        "tag,plate,owner_name,owner_phone,brand,color\n\"unclosed,a,b,c,d,e\n"]))
    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    async def test_a_csv_imports_or_is_refused_never_crashes(
            self, sqlite_url: str, text: str) -> None:
        engine = await open_database(sqlite_url)
        try:
            report = await import_vehicles(engine, "tag,plate,owner_name,owner_phone,brand,"
                                           "color,community\n" + text)
            stored = await _all(engine, select(func.count()).select_from(Vehicle))
            assert stored[0][0] == report.added  # what it says it added, nothing else
            await import_vehicles(engine, text)  # the text as the whole file
        except Invalid:
            pass
        finally:
            await engine.dispose()
