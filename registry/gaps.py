"""Batches lost upstream: gaps in a station's `seq` within one boot.

Every batch a worker stores leaves its `(station, boot, seq)` in `seen_batches`
(the dedupe keys), whichever worker took it, so the database sees what no single
worker of a shared subscription can: for each station and boot, over a recent
window, `max(seq) - min(seq) + 1` batches were sent and `count(*)` arrived. A
broker that dropped its queue or a station that lost its buffer shows as a gap
within a minute; a batch that arrives late fills its gap again.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.db import reading
from registry.models import SeenBatch

WINDOW_MS = 5 * 60_000


async def missing_batches(engine: AsyncEngine, since_ms: int) -> dict[str, int]:
    """Per station, the batches missing from the seq ranges received since `since_ms`."""
    missing = func.max(SeenBatch.seq) - func.min(SeenBatch.seq) + 1 - func.count()
    q = (select(SeenBatch.station, missing.label("missing"))
         .where(SeenBatch.received_ms >= since_ms)
         .group_by(SeenBatch.station, SeenBatch.boot).having(missing > 0))
    out: dict[str, int] = {}
    async with reading(engine).connect() as conn:
        for station, n in await conn.execute(q):
            out[station] = out.get(station, 0) + int(n)
    return out
