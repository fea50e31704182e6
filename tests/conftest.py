"""Test session fixtures: a broker of the session's own, and SQLite and PostgreSQL databases.

Under CI=true a PostgreSQL that cannot be reached fails the run instead of
skipping its tests (the brief: the storage layer is tested on both).
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest import eventloop
from ingest.broker import BrokerHandle, start_broker
from registry.db import open_database

PG_HOST = os.environ.get("BIKEWATCH_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BIKEWATCH_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("BIKEWATCH_TEST_PG_USER", "postgres")
PG_DB = os.environ.get("BIKEWATCH_TEST_PG_DB", "test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item,
                                   ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test on the loop bikewatch runs on (ingest.eventloop)."""
    return {"uvloop": eventloop.new_event_loop}


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerHandle]:
    # mosquitto where installed, else amqtt; BIKEWATCH_TEST_BROKER=amqtt forces the embedded one.
    handle = start_broker(os.environ.get("BIKEWATCH_TEST_BROKER") or None)
    yield handle
    handle.stop()


def unavailable(msg: str) -> NoReturn:
    """A suite that cannot run here: skipped on a newcomer's machine, a failure in CI."""
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def tool(name: str, package: str) -> str:
    """The path of a command the test needs, or `unavailable`. Debian keeps some off
    PATH: daemons in /usr/sbin, PostgreSQL's server programs under /usr/lib/postgresql."""
    path = (shutil.which(name) or shutil.which(f"/usr/sbin/{name}")
            or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                reverse=True)), None))
    if path is None:
        unavailable(f"{name} is not installed (Debian package {package})")
    return path


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_DB,
                                 timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _fresh_pg() -> str:
    name = f"bikewatch_t_{uuid.uuid4().hex[:12]}"
    try:
        await _pg_admin(f'CREATE DATABASE "{name}"')
    except (OSError, Exception) as exc:  # asyncpg raises many kinds; any means "not usable"
        unavailable(f"PostgreSQL on {PG_HOST}:{PG_PORT} database {PG_DB} not usable: {exc}")
    return name


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'bikewatch.db'}"
        return
    name = await _fresh_pg()
    yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = await open_database(db_url)
    yield eng
    await eng.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'bikewatch.db'}"
