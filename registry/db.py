"""Engines and sessions: SQLite (WAL) by default, PostgreSQL through asyncpg.

`open_database` checks the URL, connects, brings the schema up to the newest
migration and returns the engine; any failure is a `StoreError` naming
`BIKEWATCH_DB_URL`, which the command line turns into one line and exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite
import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from registry import sqlite_driver
from registry.errors import StoreError

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")
SUPPORTED = ("sqlite+aiosqlite", "postgresql+asyncpg")

# What a database that went away raises: SQLAlchemy's wrapper of the driver's errors, the
# socket's own, and asyncpg's where its connection is used raw (the health lease, the
# notifications). Loops that must outlive an outage catch these and try again.
DB_ERRORS: tuple[type[Exception], ...] = (DBAPIError, OSError, asyncpg.InterfaceError,
                                          asyncpg.PostgresError)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the CLI and the HTTP API read while the worker writes;
    # synchronous=NORMAL is durable across process crashes in WAL mode (only an
    # OS crash can lose the last transactions), the trade SQLite's docs advise.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    # 16 MiB of page cache per connection (the default is 2): visits are upserted
    # in tag order, all over the B-tree. There are up to 10 connections.
    cur.execute("PRAGMA cache_size=-16384")
    cur.close()
    # SQLAlchemy emits BEGIN itself (see _sqlite_begin), not the driver.
    dbapi_conn.isolation_level = None


def _sqlite_begin(conn: Any) -> None:
    # BEGIN IMMEDIATE takes the write lock up front. A deferred transaction that
    # reads and then writes fails with "database is locked" at once, whatever
    # busy_timeout says, when another connection committed in between (WAL
    # snapshot conflict); the worker, the materializer and the CLI all do that.
    # A transaction that only reads (`reading`) has no such conflict, and must not
    # queue behind a writer.
    # It goes with the transaction's first statement, in one trip (registry.sqlite_driver).
    read_only = conn.get_execution_options().get("bikewatch_read_only", False)
    sqlite_driver.begin_with_next(conn.connection.dbapi_connection,
                                  "BEGIN" if read_only else "BEGIN IMMEDIATE")


class Turn:
    """A write turn (`write_turn`): first come, first served, as asyncio.Lock, except
    that a caller asking `first()` goes ahead of all who wait. The consumer asks so for
    a transaction that writes a stolen sighting (ingest.service.Worker._group): behind
    it, the materializer's upserts, the marks of alerts delivered and station health
    queue as they come, and a sighting waited for those already queued (2.7 ms of the
    21 its slowest tenth took at 13,000 batches/s, probed)."""

    def __init__(self) -> None:
        self._held = False
        # Waiting to be handed the turn: those that asked first(), then the others.
        self._queues: tuple[deque[asyncio.Future[None]], ...] = (deque(), deque())

    def locked(self) -> bool:
        return self._held

    async def acquire(self, first: bool = False) -> None:
        if not self._held:
            self._held = True
            return
        queue = self._queues[0 if first else 1]
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(handed)
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self.release()  # handed the turn as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(handed)
            raise

    def release(self) -> None:
        """Hand the turn to the next in line, if any."""
        for queue in self._queues:
            while queue:
                handed = queue.popleft()
                if not handed.done():
                    handed.set_result(None)
                    return
        self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *_: object) -> None:
        self.release()

    @contextlib.asynccontextmanager
    async def first(self) -> AsyncIterator[None]:
        """The turn, ahead of all who wait for it."""
        await self.acquire(first=True)
        try:
            yield
        finally:
            self.release()


class _NoTurn(Turn):
    """PostgreSQL's: writers overlap."""

    async def acquire(self, first: bool = False) -> None:
        return None

    def release(self) -> None:
        return None


_NO_TURN = _NoTurn()
_TURNS: weakref.WeakKeyDictionary[Any, Turn] = weakref.WeakKeyDictionary()


def write_turn(engine: AsyncEngine) -> Turn:
    """The turn this process's writers take on a SQLite database, first come first
    served (but see `Turn.first`): the hot path's groups, the materializer, the marks
    of alerts published and posted, station health, maintenance and the checkpointer's
    second pass.

    SQLite has one write lock, and a writer that finds it taken polls for it in
    sleeps of up to 100 ms (its busy handler), past the moment it is free: a group
    behind the materializer's transaction waited that long, and its alerts with it.
    One turn per database (its pool, which `reading` shares). PostgreSQL locks rows
    and lets writers overlap: no turn."""
    if engine.dialect.name != "sqlite":
        return _NO_TURN
    pool = engine.sync_engine.pool
    turn = _TURNS.get(pool)
    if turn is None:
        turn = _TURNS[pool] = Turn()
    return turn


def _checkpoints_elsewhere(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    if not record.info.get("bikewatch_no_autocheckpoint"):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA wal_autocheckpoint=0")
        # A reader holding an old snapshot (the forecast's minutes-long query) keeps the
        # log from starting again, and it grows meanwhile (251 MB in a soak); when it
        # does start again, the file is cut back to this.
        cur.execute(f"PRAGMA journal_size_limit={Checkpointer.KEEP_LOG_BYTES}")
        cur.close()
        record.info["bikewatch_no_autocheckpoint"] = True


class Checkpointer:
    """Copies a SQLite file's write-ahead log back into the database, away from commits.

    By default the commit that takes the log past 1,000 pages does that copy
    itself, with the write lock held: with the materializer off, at 3,000
    batches/s, groups took p99 21 ms with it and 8 ms without, and the alerts in them
    and behind them waited. Here the engine's connections leave the log alone,
    and `checkpoint` copies it on a connection of its own, in aiosqlite's thread:

    - a passive checkpoint, which takes no lock and lets the hot path go on
      committing while it copies;
    - but the log only starts again from its beginning when a writer finds all
      of it copied, and at full load writers add to it while it is copied: it
      grew to 1.4 GB in a minute. So once it holds `RESTART_FRAMES`, a last
      passive pass runs inside `write_turn`, where no writer of this process can add
      to it, and the next commit starts the log again. Before it, more passes
      outside the turn copy what writers added during the one before, until that
      is little (`LEFT_FOR_TURN`): the last pass, which every writer waits for,
      copies only what they left.

    Other processes (the CLI) keep SQLite's default."""

    # 64 MiB of 4 KiB pages. The pass inside the turn held it some 20 to 35 ms
    # whatever this was (before LEFT_FOR_TURN); at 4,096 it ran every second at half
    # load, 2% of the time, and the alerts that came meanwhile were the p99
    # (alternated 20 s runs at 4,000 batches/s, police p99: 58 and 70 ms at 4,096; 48
    # and 47 at 16,384; 79 and 80 at 32,768, where the longer first pass cost more
    # than the rarer second one saved).
    RESTART_FRAMES = 16_384
    # Before the pass inside the turn, more passes outside it, while the one before
    # still copied more than this (what writers added while the one before it ran).
    # The pass inside the turn costs some 40 µs a page left (sqlite3 alone, a slow
    # hour): after one pass it copied 500 to 800 pages and held the turn 33 to 45 ms.
    # With these, p50 14 ms against 41 and 47 (probes at 6,000 batches/s, 2026-11-24).
    LEFT_FOR_TURN = 64
    CATCH_UP_PASSES = 4
    KEEP_LOG_BYTES = 64 << 20  # the log file's size kept after it starts again

    def __init__(self, engine: AsyncEngine) -> None:
        self.path = sqlite_file(engine)
        self.turn = write_turn(engine)
        self._conn: aiosqlite.Connection | None = None
        if self.path is not None:  # at checkout: connections pooled before this too
            event.listen(engine.sync_engine, "checkout", _checkpoints_elsewhere)

    async def checkpoint(self) -> tuple[int, int, int] | None:
        """Copy the log back: (busy, frames in the log, frames copied) of the last pass,
        or None for an engine that is not on a SQLite file, or if it failed (logged)."""
        if self.path is None:
            return None
        try:
            result = await self._passive(self.path)
            if result[1] >= self.RESTART_FRAMES:
                for _ in range(self.CATCH_UP_PASSES):
                    before = result[2]
                    result = await self._passive(self.path)
                    # Also below zero: the log started again during the pass.
                    if result[2] - before <= self.LEFT_FOR_TURN:
                        break
                if result[1] >= self.RESTART_FRAMES:
                    result = await self._last_pass(self.path)
        except sqlite3.Error as exc:  # the log waits for the next one; commits go on
            log.warning("WAL checkpoint of %s failed: %s", self.path, exc)
            return None
        return result

    async def _last_pass(self, path: str) -> tuple[int, int, int]:
        """The pass inside the turn: it copies what the passes before it left."""
        async with self.turn:
            return await self._passive(path)

    async def _passive(self, path: str) -> tuple[int, int, int]:
        if self._conn is None:
            self._conn = await aiosqlite.connect(path, timeout=30)
        async with self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)") as cur:
            row = await cur.fetchone()
        return (1, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


P = ParamSpec("P")
T = TypeVar("T")


async def in_transaction(engine: AsyncEngine, fn: Callable[Concatenate[Connection, P], T],
                         *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(conn, *args)` in one write transaction, committed when it returns.

    On a SQLite file the whole function runs in a thread of its own, on a plain
    sqlite3 connection to the same file (`_HotThread`): one trip there and back
    a transaction. Through aiosqlite each statement is a trip, and each trip back
    waits for the interpreter's lock: a group of the hot path made five to nine,
    0.4 ms each at p50 and 0.9 at p90 under a quarter of full load (probe,
    2026-11-25), with SQLite's write lock held throughout. Elsewhere (PostgreSQL,
    in-memory SQLite) it runs through the engine's own driver (`run_sync`)."""
    hot = _hot_thread(engine)
    if hot is None:
        async with engine.begin() as conn:
            return await conn.run_sync(fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(
        hot.thread, functools.partial(hot.run, fn, *args, **kwargs))


class _HotThread:
    """A thread and a synchronous engine on the SQLite file an async engine uses, set up
    as the async engine's connections are (pragmas, BEGIN IMMEDIATE, and no checkpoint
    on commit where the `Checkpointer` copies the log)."""

    def __init__(self, path: str, checkpointed: bool) -> None:
        self.engine = create_sync_engine(
            f"sqlite:///{path}", connect_args={"timeout": 30, "check_same_thread": False},
            hide_parameters=True, pool_size=1, max_overflow=0)
        event.listen(self.engine, "connect", _sqlite_pragmas)
        event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        if checkpointed:
            event.listen(self.engine, "checkout", _checkpoints_elsewhere)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.engine.begin() as conn:
            return fn(conn, *args, **kwargs)

    def close(self) -> None:
        self.thread.shutdown(wait=False)
        self.engine.dispose()


_HOT: weakref.WeakKeyDictionary[Any, _HotThread] = weakref.WeakKeyDictionary()


def _hot_thread(engine: AsyncEngine) -> _HotThread | None:
    """One per pool, so that it goes with it (`AsyncEngine.dispose` makes a new pool)."""
    db = sqlite_file(engine)
    if db is None:
        return None
    pool = engine.sync_engine.pool
    hot = _HOT.get(pool)
    if hot is None:
        hot = _HOT[pool] = _HotThread(db, event.contains(
            engine.sync_engine, "checkout", _checkpoints_elsewhere))
        weakref.finalize(pool, hot.close)
    return hot


def reading(engine: AsyncEngine) -> AsyncEngine:
    """`engine` (the same pool) for transactions that only read. On SQLite they begin
    deferred, so in WAL mode they never wait for a writer: a token checked for a
    Prometheus scrape answered only after another process's 12 s write lock without it."""
    return engine.execution_options(bikewatch_read_only=True)


def create_engine(url: str) -> AsyncEngine:
    """The engine for `url`. Statement parameters (owners' phones among them) never
    appear in an error message or a log line: `hide_parameters`."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"BIKEWATCH_DB_URL: {url!r} is not a database URL") from None
    if parsed.drivername not in SUPPORTED:
        raise StoreError(f"BIKEWATCH_DB_URL: driver {parsed.drivername!r} is not supported, "
                         f"use one of {', '.join(SUPPORTED)}")
    try:
        if parsed.drivername.startswith("sqlite"):
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # One trip to aiosqlite's thread a statement, not four (registry.sqlite_driver).
            engine = create_async_engine(parsed, module=sqlite_driver.DBAPI,
                                         connect_args={"timeout": 30}, hide_parameters=True)
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(engine.sync_engine, "begin", _sqlite_begin)
            return engine
        return create_async_engine(parsed, pool_size=5, max_overflow=5, pool_pre_ping=True,
                                   hide_parameters=True)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise StoreError(f"BIKEWATCH_DB_URL: {exc}") from None


MIGRATION_LOCK = 0x62696B65  # "bike": PostgreSQL advisory lock key of the migrations


def _upgrade(conn: Connection, revision: str = "head") -> None:
    if conn.dialect.name == "postgresql":
        # Workers started together (replicas, pods) would otherwise run the same migration
        # at once and fail on each other's tables; the lock ends with the transaction.
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, revision)


def lock_path(engine: AsyncEngine, name: str) -> str | None:
    """The file beside a SQLite database whose `flock` stands for what PostgreSQL does
    with an advisory lock; None for PostgreSQL and in-memory SQLite."""
    db = sqlite_file(engine)
    return None if db is None else f"{db}.{name}.lock"


def sqlite_file(engine: AsyncEngine) -> str | None:
    """The path of the SQLite file `engine` uses; None for PostgreSQL and in-memory SQLite."""
    db = engine.url.database
    return db if engine.dialect.name == "sqlite" and db and db != ":memory:" else None


@contextlib.asynccontextmanager
async def _migration_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """On a SQLite file, one process at a time opens and migrates it (PostgreSQL has its
    advisory lock, in `_upgrade`): several workers starting together on a new file were
    seen failing with "database is locked" while another was turning it to WAL."""
    path = lock_path(engine, "migrate")
    if path is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


async def open_database(url: str, *, migrate: bool = True, revision: str = "head",
                        ) -> AsyncEngine:
    """Connect, migrate to `revision` (tests of a migration stop short of head), and
    return the engine; `StoreError` if unusable."""
    engine = create_engine(url)
    try:
        async with _migration_lock(engine), engine.begin() as conn:
            if migrate:
                await conn.run_sync(_upgrade, revision)
    except DB_ERRORS as exc:
        await engine.dispose()
        first = str(getattr(exc, "orig", exc)).splitlines()[0][:200]
        raise StoreError(f"BIKEWATCH_DB_URL: cannot use {engine.url!r}: {first}") from None
    return engine


def sessions(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)
