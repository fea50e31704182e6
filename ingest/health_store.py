"""Station health in the database: what `ingest.health` keeps across a restart.

Transitions are appended and never changed; a station's current state after a
restart is its newest transition, and its last status and heard times are the
`stations` columns, written every second (a crash loses at most that much of
them: status is retained by the broker and comes back on subscribe, and a
heartbeat is due within 30 s).
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ingest.health import StationState, Transition
from registry.models import Station, StationTransition

_CHUNK = 500  # stations per query: well inside SQLite's and asyncpg's parameter limits


async def load_states(conn: AsyncConnection, stations: Collection[str], now_ms: int,
                      flap_window_ms: int) -> dict[str, StationState]:
    """The stored state of `stations`: the worker asks only for those it does not hold
    yet (all of them at start, then newly imported ones), so that a registry change,
    which must reach the hot path within a second, never scans the whole history."""
    states: dict[str, StationState] = {}
    wanted = sorted(stations)
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start:start + _CHUNK]
        for r in await conn.execute(select(
                Station.id, Station.status, Station.status_ms, Station.last_heard_ms,
                Station.last_read_ms).where(Station.id.in_(chunk))):
            states[r.id] = StationState(r.status, r.status_ms, r.last_heard_ms, r.last_read_ms)
        newest = (select(func.max(StationTransition.id))
                  .where(StationTransition.station.in_(chunk))
                  .group_by(StationTransition.station))
        for sid, up, cause, at_ms in await conn.execute(
                select(StationTransition.station, StationTransition.up, StationTransition.cause,
                       StationTransition.at_ms).where(StationTransition.id.in_(newest))):
            st = states[sid]
            st.up, st.cause, st.since_ms = bool(up), cause, at_ms
        for sid, at_ms in await conn.execute(
                select(StationTransition.station, StationTransition.at_ms)
                .where(StationTransition.station.in_(chunk),
                       StationTransition.at_ms >= now_ms - flap_window_ms)
                .order_by(StationTransition.station, StationTransition.at_ms,
                          StationTransition.id)):
            states[sid].changes.append(at_ms)
    return states


async def newest(conn: AsyncConnection) -> dict[str, tuple[bool, str]]:
    """Every station's newest stored transition: (up, cause)."""
    latest = select(func.max(StationTransition.id)).group_by(StationTransition.station)
    return {r.station: (bool(r.up), r.cause) for r in await conn.execute(
        select(StationTransition.station, StationTransition.up, StationTransition.cause)
        .where(StationTransition.id.in_(latest)))}


async def store(conn: AsyncConnection, transitions: list[Transition],
                rows: list[dict[str, object]]) -> None:
    if transitions:
        await conn.execute(insert(StationTransition), [
            {"station": t.station, "at_ms": t.at_ms, "up": t.up, "cause": t.cause}
            for t in transitions])
    if rows:
        await conn.execute(
            update(Station).where(Station.id == bindparam("sid"))
            .values(status=bindparam("st"), status_ms=bindparam("st_ms"),
                    last_heard_ms=bindparam("heard"), last_read_ms=bindparam("read")),
            rows)
