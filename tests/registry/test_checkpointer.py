"""SQLite's write-ahead log copied back by the worker's checkpointer, not by a commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.db import Checkpointer, open_database, reading, write_turn


@pytest.fixture
async def lite(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    yield engine
    await engine.dispose()


async def _autocheckpoint(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar_one())


async def _write_pages(engine: AsyncEngine, rows: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS filler (b BLOB)"))
        await conn.exec_driver_sql("INSERT INTO filler VALUES (zeroblob(4000))",
                                   [() for _ in range(rows)])


async def test_commits_leave_the_log_to_the_checkpointer(lite: AsyncEngine,
                                                         tmp_path: Path) -> None:
    assert await _autocheckpoint(lite) == 1000  # SQLite's default, as the CLI keeps it
    checkpointer = Checkpointer(lite)
    try:
        assert checkpointer.path == str(tmp_path / "x.db")
        assert await _autocheckpoint(lite) == 0  # every connection the worker checks out
        await _write_pages(lite, 1500)  # past 1,000 pages: a commit would have copied them
        db = tmp_path / "x.db"
        assert db.stat().st_size < 1500 * 4000  # the rows are in the log only
        busy, frames, copied = await checkpointer.checkpoint() or (1, 0, 0)
        assert busy == 0 and frames > 1500 and copied == frames
        assert db.stat().st_size > 1500 * 4000  # now in the database file
        await _write_pages(lite, 10)
        busy, frames, copied = await checkpointer.checkpoint() or (1, 0, 0)
        assert busy == 0 and copied == frames
    finally:
        await checkpointer.close()


async def test_no_file_no_checkpoints() -> None:
    engine = await open_database("sqlite+aiosqlite:///:memory:")
    try:
        checkpointer = Checkpointer(engine)
        assert checkpointer.path is None
        assert await checkpointer.checkpoint() is None
        assert await _autocheckpoint(engine) == 1000
    finally:
        await engine.dispose()


async def test_a_failed_checkpoint_is_logged_and_the_next_one_tried(
        lite: AsyncEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    checkpointer = Checkpointer(lite)
    checkpointer.path = str(tmp_path / "gone" / "x.db")  # a file that cannot be opened
    with caplog.at_level(logging.WARNING, logger="registry.db"):
        assert await checkpointer.checkpoint() is None
    assert "WAL checkpoint" in caplog.text and "gone" in caplog.text
    checkpointer.path = str(tmp_path / "x.db")
    await _write_pages(lite, 5)
    result = await checkpointer.checkpoint()
    assert result is not None and result[0] == 0 and result[2] == result[1] > 0
    await checkpointer.close()


async def test_the_log_starts_again_while_writers_keep_writing(
        lite: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers that take the worker's turn write all along; the log is copied back as
    they do. Copied passively only, it never found a moment with all of it copied and
    grew by all that was written; the pass inside the turn lets it start again."""
    monkeypatch.setattr(Checkpointer, "RESTART_FRAMES", 200)
    turn = write_turn(lite)
    checkpointer = Checkpointer(lite)
    await _write_pages(lite, 1)
    done = asyncio.Event()

    async def write() -> None:
        for _ in range(150):  # 3,000 pages in all
            async with turn:
                await _write_pages(lite, 20)
        done.set()

    async def copy() -> None:
        while not done.is_set():
            await checkpointer.checkpoint()
            await asyncio.sleep(0.005)

    try:
        await asyncio.gather(write(), copy())
    finally:
        await checkpointer.close()
    wal = (tmp_path / "x.db-wal").stat().st_size // 4096
    assert wal < 1000, f"the log grew to {wal} pages"


async def test_a_log_grown_behind_a_reader_is_cut_back_once_it_starts_again(
        lite: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Checkpointer, "KEEP_LOG_BYTES", 200 * 4096)
    checkpointer = Checkpointer(lite)
    wal = tmp_path / "x.db-wal"
    try:
        async with reading(lite).connect() as reader:
            await reader.exec_driver_sql("SELECT count(*) FROM stations")  # holds a snapshot
            await _write_pages(lite, 1000)
            await checkpointer.checkpoint()  # cannot copy past the reader's snapshot
        assert wal.stat().st_size > 1000 * 4096
        await checkpointer.checkpoint()  # the reader is gone: all copied
        await _write_pages(lite, 1)  # starts the log again, and cuts the file back
        assert wal.stat().st_size <= 200 * 4096
    finally:
        await checkpointer.close()


async def test_the_pass_inside_the_turn_waits_until_little_is_left(
        lite: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers add to the log while a pass copies it, and the pass inside the turn
    copies what the last one outside it left, at some 40 µs a page, with every
    writer waiting: passes outside it go on first while the one before copied more
    than LEFT_FOR_TURN. (The test above runs it against real writers.)"""
    checkpointer = Checkpointer(lite)
    # (busy, frames in the log, frames copied) as each pass outside the turn finds
    # them, the log growing by 400, 100, 30 and 10 pages as they run.
    found = iter([(0, 20_000, 20_000), (0, 20_400, 20_400), (0, 20_500, 20_500),
                  (0, 20_530, 20_530), (0, 20_540, 20_540)])
    outside: list[tuple[int, int, int]] = []
    inside: list[tuple[int, int, int]] = []

    async def pass_outside(_path: str) -> tuple[int, int, int]:
        outside.append(next(found))
        return outside[-1]

    async def pass_inside(_path: str) -> tuple[int, int, int]:
        inside.append((0, 20_540, 20_540))
        return inside[-1]

    monkeypatch.setattr(checkpointer, "_passive", pass_outside)
    monkeypatch.setattr(checkpointer, "_last_pass", pass_inside)
    assert checkpointer.LEFT_FOR_TURN == 64
    assert await checkpointer.checkpoint() == (0, 20_540, 20_540)
    # The fourth pass copied 30 pages (the third, 100): the turn's comes next.
    assert [f for _, f, _ in outside] == [20_000, 20_400, 20_500, 20_530]
    assert len(inside) == 1
    outside.clear()
    inside.clear()
    # A log that started again meanwhile (fewer frames than before): no more passes,
    # and none inside the turn.
    found = iter([(0, 20_000, 20_000), (0, 300, 300)])
    assert await checkpointer.checkpoint() == (0, 300, 300)
    assert len(outside) == 2 and not inside
    # At most CATCH_UP_PASSES more, however fast the writers are.
    found = iter([(0, 20_000 + 1_000 * k, 20_000 + 1_000 * k) for k in range(10)])
    outside.clear()
    await checkpointer.checkpoint()
    assert len(outside) == 1 + checkpointer.CATCH_UP_PASSES and len(inside) == 1
    await checkpointer.close()
