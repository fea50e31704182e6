"""One worker among many holds a role: a lock that dies with its holder.

Station health is tracked by every worker (each sees every status and heartbeat),
so that any worker's `/metrics` shows the same stations up and down; but one only,
the holder of the health lease, stores the transitions and tells operators, or N
workers would record each change N times.

On PostgreSQL the lease is a session advisory lock: if the holder dies,
PostgreSQL ends its session and releases it. On SQLite (workers on one machine:
`bikewatch serve --workers N`) it is an exclusive `flock` on a file beside the
database, which the kernel releases when the holder's process ends. Either way
another worker takes it within `RETRY_S`. An in-memory SQLite database has one
worker by nature: it always holds the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from registry.db import DB_ERRORS, lock_path

HEALTH = 0x6865616C  # "heal"
RETRY_S = 2.0
log = logging.getLogger(__name__)


class Lease:
    def __init__(self, engine: AsyncEngine, key: int, name: str) -> None:
        self.engine, self.key, self.name = engine, key, name
        self.lock_file = lock_path(engine, name.replace(" ", "-"))
        self.held = engine.dialect.name != "postgresql" and self.lock_file is None
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
                await (self._session(stop) if self.lock_file is None
                       else self._file_session(self.lock_file, stop))
            except DB_ERRORS as exc:
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

    async def _file_session(self, path: str, stop: asyncio.Event) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while not stop.is_set():
                if not self.held:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        self.held = True
                        log.info("%s lease taken", self.name)
                        self.gained.set()
                    except BlockingIOError:
                        pass  # another worker's
                    self.decided.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_S)
        finally:
            os.close(fd)  # releases the lock
            self.held = False
