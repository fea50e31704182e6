"""Station health: online/offline and last heard, for `bikewatch_station_up`.

A station is up while its retained `status` is `online` and it has been heard
(heartbeat, reads or status) within the heartbeat timeout; a station never
heard from is down. Only imported stations count (PROTOCOL.md sections 1, 5).
Times only move forward: a late heartbeat never makes a station look older.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ingest.metrics import StationRow
from registry.models import Station
from registry.stations import StationInfo


@dataclass(slots=True)
class _State:
    status: str | None = None
    status_ms: int | None = None
    last_heard_ms: int | None = None


class StationHealth:
    def __init__(self, timeout_ms: int, clock: Callable[[], int]) -> None:
        self.timeout_ms = timeout_ms
        self._clock = clock
        self._state: dict[str, _State] = {}
        self._directory: dict[str, StationInfo] = {}
        self._dirty: set[str] = set()

    async def load(self, conn: AsyncConnection, directory: dict[str, StationInfo]) -> None:
        """Take the directory, and the persisted state of stations not yet in memory."""
        self._directory = directory
        rows = await conn.execute(select(Station.id, Station.status, Station.status_ms,
                                         Station.last_heard_ms))
        for r in rows:
            if r.id not in self._state:
                self._state[r.id] = _State(r.status, r.status_ms, r.last_heard_ms)

    def heard(self, station: str, at_ms: int) -> None:
        st = self._state.setdefault(station, _State())
        if st.last_heard_ms is None or at_ms > st.last_heard_ms:
            st.last_heard_ms = at_ms
            self._dirty.add(station)

    def status(self, station: str, text: str, at_ms: int) -> None:
        st = self._state.setdefault(station, _State())
        if st.status_ms is None or at_ms >= st.status_ms:
            st.status, st.status_ms = text, at_ms
            self._dirty.add(station)
        if text == "online":
            self.heard(station, at_ms)

    def is_up(self, station: str, now_ms: int) -> bool:
        st = self._state.get(station)
        return (st is not None and st.status == "online" and st.last_heard_ms is not None
                and now_ms - st.last_heard_ms <= self.timeout_ms)

    def rows(self) -> Iterator[StationRow]:
        now = self._clock()
        for sid, info in self._directory.items():
            if info.imported:
                yield sid, info.zone, self.is_up(sid, now)

    def online_ratio(self) -> float:
        rows = list(self.rows())
        return sum(r[2] for r in rows) / len(rows) if rows else 0.0

    def take_dirty(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = [
            {"sid": s, "st": self._state[s].status, "st_ms": self._state[s].status_ms,
             "heard": self._state[s].last_heard_ms} for s in sorted(self._dirty)]
        self._dirty.clear()
        return out

    def mark_dirty(self, rows: list[dict[str, object]]) -> None:
        """Put back what `take_dirty` gave, when its transaction failed."""
        self._dirty.update(str(r["sid"]) for r in rows)


async def persist(engine: AsyncEngine, health: StationHealth) -> None:
    """Write the stations' state that changed since the last call.

    Every few seconds, not per group: last-heard times are not read effects
    (a restart loses at most this interval of them; status is retained by the
    broker and comes back on subscribe), and one UPDATE per station per group
    cost a fifth of the hot path's database time."""
    rows = health.take_dirty()
    if not rows:
        return
    try:
        async with engine.begin() as conn:
            await conn.execute(
            update(Station).where(Station.id == bindparam("sid"))
                .values(status=bindparam("st"), status_ms=bindparam("st_ms"),
                        last_heard_ms=bindparam("heard")),
                rows)
    except BaseException:
        health.mark_dirty(rows)
        raise
