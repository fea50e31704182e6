"""One worker among many holds a role: a PostgreSQL session advisory lock.

Station health is tracked by every worker (each sees every status and heartbeat),
so that any worker's `/metrics` shows the same stations up and down; but one only,
the holder of the health lease, stores the transitions and tells operators, or N
workers would record each change N times. The lock belongs to one connection: if
the holder dies, PostgreSQL ends its session and releases it, and another worker
takes it within `RETRY_S`. On SQLite, one machine and one worker, it is always held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

HEALTH = 0x6865616C  # "heal"
RETRY_S = 2.0
log = logging.getLogger(__name__)


class Lease:
    def __init__(self, engine: AsyncEngine, key: int, name: str) -> None:
        self.engine, self.key, self.name = engine, key, name
        self.held = engine.dialect.name != "postgresql"
        self.gained = asyncio.Event()  # set on every gain; the holder clears it
        self.decided = asyncio.Event()  # the first attempt is over, held or not

    async def run(self, stop: asyncio.Event) -> None:
        """Try for the lock, hold it while the connection lives, until `stop`."""
        if self.held:
            self.gained.set()
            self.decided.set()
            return
        while not stop.is_set():
            try:
                await self._session(stop)
            except (DBAPIError, OSError) as exc:
                log.warning("%s lease: %s", self.name, str(exc).splitlines()[0][:200])
            self.decided.set()
            if self.held:
                log.warning("%s lease lost", self.name)
            self.held = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)

    async def _session(self, stop: asyncio.Event) -> None:
        async with self.engine.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            while not stop.is_set():
                if not self.held:
                    self.held = bool(await raw.fetchval("SELECT pg_try_advisory_lock($1)",
                                                        self.key))
                    if self.held:
                        log.info("%s lease taken", self.name)
                        self.gained.set()
                    self.decided.set()
                else:
                    await raw.fetchval("SELECT 1")  # still ours: the session is alive
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_S)
            if self.held:
                await raw.fetchval("SELECT pg_advisory_unlock($1)", self.key)
                self.held = False
