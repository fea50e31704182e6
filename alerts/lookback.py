"""Late reports: a theft reported hours after it happened (PROTOCOL.md section 4,
`--stolen-at` in the past) raises at once an alert for where the bike was last seen.

When a case opens, the worker looks through the stored visits of its tag since
`stolen_at` and raises the alert of the newest one, with the trajectory so far
and `late: true` when that sighting is older than `late_after_s`. From then on
the live path raises one alert per new visit. It is the same alert the live
path would have raised (same unique key: case, kind, station, visit start), so
a repeated look (a restart, another worker) raises nothing twice.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.engine import NextStations, RaisedAlert, Sighting, Vehicles, raise_alert
from registry.db import in_transaction, reading, write_turn
from registry.models import TheftCase, Visit
from registry.stations import StationInfo
from registry.tags import from_db


async def look_back(engine: AsyncEngine, case_ids: Collection[str],
                    stations: Mapping[str, StationInfo], now_ms: int, late_after_ms: int,
                    webhooks: Callable[[str], Sequence[str]],
                    forecast: NextStations) -> list[RaisedAlert]:
    """Alerts for those of `case_ids` that are open, have no alert yet, and whose bike
    was seen since the theft. The visit log must be folded in first (ingest.visitlog)."""
    if not case_ids:
        return []
    seen = []
    # Most cases opened have no sighting yet: found by reading alone, which on SQLite
    # does not wait for the write lock (registry.db.reading) the way raising does.
    async with reading(engine).connect() as conn:
        cases = (await conn.execute(
            select(TheftCase.case_id, TheftCase.tag, TheftCase.stolen_ms)
            .where(TheftCase.case_id.in_(list(case_ids)), TheftCase.status == "open",
                   TheftCase.updates == 0))).all()
        for case in cases:
            last = (await conn.execute(
                select(Visit.station, Visit.first_ms)
                .where(Visit.tag == case.tag, Visit.last_ms >= case.stolen_ms)
                .order_by(Visit.first_ms.desc()).limit(1))).first()
            if last is not None:
                seen.append(Sighting(case.case_id, from_db(case.tag), last.station,
                                     last.first_ms, case.stolen_ms, now_ms))
    raised = []
    vehicles = Vehicles()
    for sighting in seen:
        async with write_turn(engine):
            alert = await in_transaction(engine, raise_alert, sighting, stations, now_ms,
                                         late_after_ms, vehicles, webhooks, forecast)
        if alert is not None:
            raised.append(alert)
    return raised
