"""Registry changes pushed to every worker: PostgreSQL `LISTEN/NOTIFY`.

`bump_version` notifies in the transaction of the change, and PostgreSQL delivers
a notification only when that transaction commits, to every listening session
on any machine: a worker never hears of a change it cannot read yet, and never
misses one that committed. A retained MQTT message would be a second system
to keep in step with the database (published but rolled back, or published
before the commit could be read). The workers still poll the version row every
0.25 s: the safety net while a listening connection is re-established, and the
only mechanism on SQLite, which serves one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from registry.db import DB_ERRORS

CHANNEL = "bikewatch_registry"
RETRY_S = 2.0
log = logging.getLogger(__name__)


async def announce(conn: AsyncConnection) -> None:
    """Tell the listening workers, on commit, that the registry version moved."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text(f"NOTIFY {CHANNEL}"))


async def listen(engine: AsyncEngine, wake: Callable[[], None], stop: asyncio.Event) -> None:
    """Call `wake` on every registry change until `stop` is set; reconnect after a
    lost connection. Returns at once where there is nothing to listen to (SQLite)."""
    if engine.dialect.name != "postgresql":
        return
    while not stop.is_set():
        try:
            await _session(engine, wake, stop)
        except DB_ERRORS as exc:
            log.warning("registry notifications: %s", str(exc).splitlines()[0][:200])
        if not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)


async def _session(engine: AsyncEngine, wake: Callable[[], None], stop: asyncio.Event) -> None:
    """Listen on one connection until `stop` is set or the connection is lost."""
    lost = asyncio.Event()

    def heard(*_args: object) -> None:
        wake()

    async with engine.connect() as conn:
        raw: Any = (await conn.get_raw_connection()).driver_connection
        raw.add_termination_listener(lambda _c: lost.set())
        await raw.add_listener(CHANNEL, heard)
        wake()  # changes made while not listening
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not raw.is_closed():
            await raw.remove_listener(CHANNEL, heard)
