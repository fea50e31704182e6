"""Station health in the database: what `ingest.health` keeps across a restart.

Transitions are appended and never changed; a station's current state after a
restart is its newest transition, and its last status and heard times are the
`stations` columns, written every second (a crash loses at most that much of
them: status is retained by the broker and comes back on subscribe, and a
heartbeat is due within 30 s).
"""

from __future__ import annotations

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ingest.health import StationState, Transition
from registry.models import Station, StationTransition


async def load_states(conn: AsyncConnection, now_ms: int, flap_window_ms: int,
                      ) -> dict[str, StationState]:
    states = {r.id: StationState(r.status, r.status_ms, r.last_heard_ms, r.last_read_ms)
              for r in await conn.execute(select(
                  Station.id, Station.status, Station.status_ms, Station.last_heard_ms,
                  Station.last_read_ms))}
    newest = select(func.max(StationTransition.id)).group_by(StationTransition.station)
    for r in await conn.execute(
            select(StationTransition.station, StationTransition.up, StationTransition.cause,
                   StationTransition.at_ms).where(StationTransition.id.in_(newest))):
        st = states.get(r.station)
        if st is not None:
            st.up, st.cause, st.since_ms = bool(r.up), r.cause, r.at_ms
    for station, at_ms in await conn.execute(
            select(StationTransition.station, StationTransition.at_ms)
            .where(StationTransition.at_ms >= now_ms - flap_window_ms)
            .order_by(StationTransition.station, StationTransition.at_ms,
                      StationTransition.id)):
        st = states.get(station)
        if st is not None:
            st.changes.append(at_ms)
    return states


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
