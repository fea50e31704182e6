"""Read-only queries shared by the command line and the HTTP API."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.models import RejectRecord, Station, Visit
from registry.tags import to_db


async def list_rejects(engine: AsyncEngine, limit: int = 50, reason: str | None = None,
                       station: str | None = None) -> list[dict[str, Any]]:
    """Newest first, with the first bytes of each payload shown safely."""
    q = select(RejectRecord).order_by(RejectRecord.id.desc()).limit(limit)
    if reason:
        q = q.where(RejectRecord.reason == reason)
    if station:
        q = q.where(RejectRecord.station == station)
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    return [{"received_ms": r.received_ms, "station": r.station, "reason": r.reason,
             "reads": r.reads, "detail": r.detail, "boot": r.boot, "seq": r.seq,
             "payload_bytes": len(r.payload), "payload_prefix": r.payload[:120].decode(
                 "utf-8", "backslashreplace")} for r in rows]


async def count_rejects(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(RejectRecord)))
                   .scalar_one())


async def trajectory(engine: AsyncEngine, tag: int, since_ms: int = 0,
                     limit: int = 1000) -> list[dict[str, Any]]:
    """A tag's station visits since `since_ms`, oldest first."""
    async with engine.connect() as conn:
        rows = (await conn.execute(
            select(Visit.station, Visit.first_ms, Visit.last_ms, Visit.reads, Visit.best_rssi,
                   Station.name, Station.lat, Station.lon, Station.zone)
            .join(Station, Station.id == Visit.station, isouter=True)
            .where(Visit.tag == to_db(tag), Visit.last_ms >= since_ms)
            .order_by(Visit.first_ms).limit(limit))).all()
    return [{"station": r.station, "name": r.name or "", "lat": r.lat, "lon": r.lon,
             "zone": r.zone or "unassigned", "first_ms": r.first_ms, "last_ms": r.last_ms,
             "reads": r.reads, "best_rssi": r.best_rssi} for r in rows]
