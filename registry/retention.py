"""Sightings are kept for a while, not for ever: visits older than the retention are
deleted, except the visits of bikes with an open case (their trajectory is evidence).

Visits are walked in id order through the primary key, which is insertion order and
so, but for late reads, the order of their first read: the walk stops at the first
chunk with nothing old enough. No index on `last_ms` is needed, which would slow
the hot path's upserts.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.models import TheftCase, Visit

CHUNK = 5_000
MAX_CHUNKS = 200  # a million visits a run at most: the rest waits for the next run


async def forget_sightings(engine: AsyncEngine, cutoff_ms: int) -> int:
    """Delete visits that ended before `cutoff_ms`, but those of open cases' tags; the
    number deleted."""
    deleted, after = 0, -1
    for _ in range(MAX_CHUNKS):
        async with engine.begin() as conn:
            keep: Collection[int] = set((await conn.execute(
                select(TheftCase.tag).where(TheftCase.status == "open"))).scalars())
            rows = (await conn.execute(select(Visit.id, Visit.tag, Visit.last_ms)
                                       .where(Visit.id > after).order_by(Visit.id)
                                       .limit(CHUNK))).all()
            if not rows:
                break
            old = [r.id for r in rows if r.last_ms < cutoff_ms and r.tag not in keep]
            if old:
                await conn.execute(delete(Visit).where(Visit.id.in_(old)))
            deleted += len(old)
            after = rows[-1].id
            if all(r.last_ms >= cutoff_ms for r in rows):
                break
    return deleted
