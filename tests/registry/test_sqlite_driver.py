"""SQLite statements in one trip to aiosqlite's thread, with SQLAlchemy's results unchanged."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.db import open_database
from registry.sqlite_driver import OneTripCursor


@pytest.fixture
async def lite(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    yield engine
    await engine.dispose()


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every call aiosqlite runs in its thread, as the function it runs."""
    calls: list[Any] = []
    run = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kw: Any) -> Any:
        calls.append(fn)
        return await run(self, fn, *args, **kw)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return calls


async def test_a_statement_is_one_trip(lite: AsyncEngine, trips: list[Any]) -> None:
    async with lite.begin() as conn:
        await conn.execute(text("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT UNIQUE)"))
        trips.clear()
        rows = (await conn.execute(text("SELECT 1 AS x UNION SELECT 2 ORDER BY x"))).all()
        assert [tuple(r) for r in rows] == [(1,), (2,)]
        assert len(trips) == 1
        await conn.exec_driver_sql("INSERT INTO t (b) VALUES (?)", [("p",), ("q",), ("r",)])
        assert len(trips) == 2  # executemany too
        assert isinstance(conn.sync_connection.connection.dbapi_connection.cursor(),  # type: ignore[union-attr]
                          OneTripCursor)


async def test_a_transaction_begins_in_its_first_statements_trip(
        lite: AsyncEngine, trips: list[Any]) -> None:
    async with lite.begin() as conn:
        await conn.execute(text("CREATE TABLE t (a INTEGER)"))
    trips.clear()
    async with lite.begin() as conn:
        await conn.execute(text("INSERT INTO t VALUES (1)"))
        assert len(trips) == 1  # BEGIN IMMEDIATE and the insert
        # ... and the write lock is taken: another connection cannot write meanwhile
        other = sqlite3.connect(lite.url.database or "", timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
    assert [getattr(f, "__name__", "") for f in trips] == ["_run", "commit"]
    trips.clear()
    async with lite.connect() as conn:  # reads: BEGIN with the select, one rollback
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1
    assert [getattr(f, "__name__", "") for f in trips] == ["_run", "rollback"]


async def test_ending_a_transaction_that_ran_nothing_makes_no_trip(
        lite: AsyncEngine, trips: list[Any]) -> None:
    async with lite.begin() as conn:
        await conn.execute(text("CREATE TABLE t (a INTEGER)"))
    trips.clear()
    async with lite.begin():
        pass
    async with lite.connect() as conn:
        await conn.rollback()
    assert trips == []
    async with lite.begin() as conn:  # the BEGIN not run then does not linger
        await conn.execute(text("INSERT INTO t VALUES (1)"))
        await conn.rollback()
    async with lite.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 0


async def test_results_read_as_they_do_through_the_stock_adapter(lite: AsyncEngine) -> None:
    async with lite.begin() as conn:
        await conn.execute(text("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT UNIQUE)"))
        ins = await conn.execute(text("INSERT INTO t (b) VALUES ('p')"))
        assert ins.lastrowid == 1 and ins.rowcount == 1
        await conn.execute(text("INSERT INTO t (b) VALUES ('q'), ('r')"))
        upd = await conn.execute(text("UPDATE t SET b = b || '!' WHERE a > 1"))
        assert upd.rowcount == 2
        result = await conn.execute(text("SELECT a, b FROM t ORDER BY a"))
        assert list(result.keys()) == ["a", "b"]
        assert result.fetchone() == (1, "p")
        assert result.fetchmany(1) == [(2, "q!")]
        assert result.fetchall() == [(3, "r!")]
        returned = await conn.execute(text("DELETE FROM t WHERE a = 3 RETURNING b"))
        assert returned.scalar_one() == "r!"
        assert (await conn.execute(text("SELECT b FROM t WHERE a = 9"))).first() is None


async def test_driver_errors_are_sqlalchemys_and_the_transaction_survives(
        lite: AsyncEngine) -> None:
    async with lite.begin() as conn:
        await conn.execute(text("CREATE TABLE t (b TEXT UNIQUE)"))
        await conn.execute(text("INSERT INTO t VALUES ('p')"))
    async with lite.connect() as conn:
        with pytest.raises(IntegrityError):
            await conn.execute(text("INSERT INTO t VALUES ('p')"))
        await conn.rollback()
        with pytest.raises(OperationalError):
            await conn.execute(text("SELECT nope FROM t"))
        await conn.rollback()
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1
