"""A write transaction run as one plain function (registry.db.in_transaction): committed
when it returns, rolled back when it raises, on both databases; on a SQLite file, in the
database's own thread with the write lock taken from its start."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import Connection, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.db import in_transaction, open_database
from registry.models import SeenBatch


def _keep(conn: Connection, seq: int, fail: bool = False) -> str:
    conn.execute(insert(SeenBatch).values(station="S", boot=1, seq=seq, received_ms=seq))
    if fail:
        raise RuntimeError("half done")
    return threading.current_thread().name


async def _count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(SeenBatch))).scalar_one())


async def test_returned_is_committed_and_raised_is_rolled_back(engine: AsyncEngine) -> None:
    await in_transaction(engine, _keep, 1)
    assert await _count(engine) == 1
    with pytest.raises(RuntimeError, match="half done"):
        await in_transaction(engine, _keep, 2, fail=True)
    assert await _count(engine) == 1
    await in_transaction(engine, _keep, 3)  # the connection is usable after a failure
    assert await _count(engine) == 2


async def test_on_a_sqlite_file_it_runs_in_a_thread_holding_the_write_lock(
        tmp_path: Path) -> None:
    path = str(tmp_path / "hot.db")
    engine = await open_database(f"sqlite+aiosqlite:///{path}")

    def locked(conn: Connection) -> str:
        conn.execute(select(1))  # a read first: the lock is taken at BEGIN all the same
        other = sqlite3.connect(path, timeout=0)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()
        return _keep(conn, 7)

    try:
        name = await in_transaction(engine, locked)
        assert name != threading.current_thread().name and name.startswith("sqlite-writer")
        assert await _count(engine) == 1
    finally:
        await engine.dispose()
