"""Registry storage on SQLite and PostgreSQL: migrations, imports, theft cases, snapshot."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.cases import recover_theft, report_theft
from registry.db import open_database
from registry.errors import Refused, StoreError
from registry.imports import import_stations, import_vehicles
from registry.models import Base, TheftCase
from registry.snapshot import load_stolen_set
from registry.tags import to_db

NOW = 1_763_803_800_000
STATIONS = """id,name,lat,lon,zone,installed
SP-0001,Harbour Rd / 3rd St,28.73,121.55,shangpan,2025
SP-0002,Market,28.74,121.56,shangpan,2025
SP-0003,No coordinates,,,xiaozhi,2025
"""
VEHICLES = """tag,plate,owner_name,owner_phone,brand,color
00a1b2c3,ZJ-J12345,Li Lei,13800001234,Yadea,white
FFFFFFFFFFFFFFFF,ZJ-J2,Han Meimei,13900001234,Niu,black
"""


class TestMigrations:
    async def test_schema_matches_the_models(self, engine: AsyncEngine) -> None:
        """The migrations build exactly the models: tables, columns, types, indexes,
        constraints (alembic's own comparison, as `alembic revision --autogenerate`)."""
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            diff = await conn.run_sync(lambda c: compare_metadata(
                MigrationContext.configure(c), Base.metadata))
        assert set(Base.metadata.tables) <= tables
        assert diff == []

    async def test_migrating_twice_is_harmless(self, db_url: str, engine: AsyncEngine) -> None:
        again = await open_database(db_url)
        await again.dispose()

    async def test_workers_starting_together_migrate_once(self, db_url: str) -> None:
        engines = await asyncio.gather(*(open_database(db_url) for _ in range(4)))
        for engine in engines:
            await engine.dispose()

    async def test_owners_move_out_of_vehicles(self, db_url: str) -> None:
        old = await open_database(db_url, revision="0008")
        async with old.begin() as conn:
            await conn.execute(text(
                "INSERT INTO vehicles (tag, plate, owner_name, owner_phone, brand, color) "
                "VALUES (1, 'ZJ-O1', 'Li Lei', '138 0000 1234', 'Yadea', 'white'), "
                "(2, 'ZJ-2', 'Li Lei', '138 0000 1234', 'Niu', 'red'), "
                "(3, 'ZJ-3', '', '', 'Niu', 'red')"))
        await old.dispose()
        engine = await open_database(db_url)
        try:
            async with engine.connect() as conn:
                owners = (await conn.execute(text(
                    "SELECT id, name, phone, phone_key FROM owners"))).all()
                vehicles = (await conn.execute(text(
                    "SELECT tag, owner_id, plate_key FROM vehicles ORDER BY tag"))).all()
        finally:
            await engine.dispose()
        assert [tuple(o[1:]) for o in owners] == [("Li Lei", "138 0000 1234", "13800001234")]
        assert [tuple(v) for v in vehicles] == [(1, owners[0][0], "2J01"),
                                                (2, owners[0][0], "2J2"), (3, None, "2J3")]

    async def test_unusable_database_names_the_setting(self) -> None:
        with pytest.raises(StoreError, match="BIKEWATCH_DB_URL"):
            await open_database("postgresql+asyncpg://nobody@127.0.0.1:1/none")
        with pytest.raises(StoreError, match="BIKEWATCH_DB_URL"):
            await open_database("mysql://x/y")


class TestImports:
    async def test_same_file_twice_changes_nothing(self, engine: AsyncEngine) -> None:
        first = await import_stations(engine, STATIONS, NOW)
        second = await import_stations(engine, STATIONS, NOW)
        assert (first.added, first.errors) == (3, [])
        assert (second.added, second.updated, second.unchanged) == (0, 0, 3)
        v1 = await import_vehicles(engine, VEHICLES)
        v2 = await import_vehicles(engine, VEHICLES)
        assert (v1.added, v2.unchanged) == (2, 2)

    async def test_changed_row_is_updated(self, engine: AsyncEngine) -> None:
        await import_stations(engine, STATIONS, NOW)
        report = await import_stations(engine, STATIONS.replace("Market", "Old Market"), NOW)
        assert (report.updated, report.unchanged) == (1, 2)

    async def test_bad_rows_are_reported_with_line_and_reason(self, engine: AsyncEngine) -> None:
        text = (VEHICLES + "0xab,P,N,1,B,C\n" + "zz,P,N,1,B,C\n" + "12345678901234567,P,N,1,B,C\n"
                + "00A1B2C3,dup,N,1,B,C\n" + "abc,P\n")
        report = await import_vehicles(engine, text)
        assert report.added == 2
        assert [line for line, _ in report.errors] == [4, 5, 6, 7, 8]
        assert "duplicate tag, first at line 2" in report.errors[3][1]
        bad = await import_stations(engine, STATIONS + "bad id!,x,1,1,z\nSP-9,x,91,1,z\n"
                                    "SP-8,x,1,,z\n", NOW)
        assert [line for line, _ in bad.errors] == [5, 6, 7]

    async def test_optional_timeout_column(self, engine: AsyncEngine) -> None:
        from registry.stations import load_directory

        text = "id,name,lat,lon,zone,timeout_s\nS1,a,,,z,600\nS2,b,,,z,\nS3,c,,,z,-1\n"
        report = await import_stations(engine, text, NOW)
        assert report.added == 2 and report.errors == [(4, "timeout_s -1.0 is not in "
                                                           "(0, 604800]")]
        async with engine.connect() as conn:
            directory = await load_directory(conn)
        assert (directory["S1"].timeout_s, directory["S2"].timeout_s) == (600.0, None)
        # a file without the column leaves the timeouts as they are
        await import_stations(engine, "id,name,lat,lon,zone\nS1,renamed,,,z\n", NOW)
        async with engine.connect() as conn:
            assert (await load_directory(conn))["S1"].timeout_s == 600.0

    async def test_missing_columns_refuse_the_file(self, engine: AsyncEngine) -> None:
        with pytest.raises(Refused, match="lacks the column"):
            await import_vehicles(engine, "tag,plate\n1,2\n")


class TestCases:
    async def test_report_and_recover_move_the_snapshot(self, engine: AsyncEngine) -> None:
        await import_vehicles(engine, VEHICLES)
        await report_theft(engine, 0xFFFFFFFFFFFFFFFF, "LH-1", NOW - 1000, NOW)
        async with engine.connect() as conn:
            snap = await load_stolen_set(conn, NOW)
        assert snap.tags.tolist() == [0xFFFFFFFFFFFFFFFF] and snap.case_ids == ("LH-1",)
        assert snap.stolen_at_ms.tolist() == [NOW - 1000]
        again = await report_theft(engine, 0xFFFFFFFFFFFFFFFF, "LH-1", NOW - 1000, NOW)
        assert not again.changed
        assert (await recover_theft(engine, "LH-1", NOW)).changed
        async with engine.connect() as conn:
            after = await load_stolen_set(conn, NOW)
        assert len(after) == 0 and after.version > snap.version

    async def test_refusals(self, engine: AsyncEngine) -> None:
        await import_vehicles(engine, VEHICLES)
        with pytest.raises(Refused, match="not registered"):
            await report_theft(engine, 0x1234, "LH-1", NOW, NOW)
        with pytest.raises(Refused, match="unknown case"):
            await recover_theft(engine, "LH-404", NOW)
        await report_theft(engine, 0xA1B2C3, "LH-1", NOW, NOW)
        with pytest.raises(Refused, match="already reported stolen under case LH-1"):
            await report_theft(engine, 0xA1B2C3, "LH-2", NOW, NOW)

    async def test_one_open_case_per_tag_is_a_database_constraint(
            self, engine: AsyncEngine) -> None:
        await import_vehicles(engine, VEHICLES)
        row = {"tag": to_db(0xA1B2C3), "status": "open", "stolen_ms": NOW, "reported_ms": NOW,
               "updates": 0}
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(TheftCase.__table__.insert(), [
                    row | {"case_id": "A"}, row | {"case_id": "B"}])
