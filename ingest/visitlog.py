"""The visit log: how a group's visits become durable cheaply, then queryable.

Upserting visits row by row into a table indexed by tag costs SQLite 5 to 30
µs a row (random B-tree inserts, measured), far too much for every read of a
busy town. So the hot path appends the group's visit segments to `visit_log`
as one packed row, in the same transaction as the dedupe keys: that is the
durable effect the broker's acknowledgement waits for (DESIGN.md decision 3).

The materializer then folds the log into `visits` in the background, many
groups at a time, merging the segments of one visit first (a bike in range
for a minute is one row, not sixty): it reads the oldest log rows, upserts,
and deletes them, all in one transaction, so a crash anywhere applies each log
row exactly once. Upserts add reads and take maxima, so log rows may be
applied in any order, by any worker (PostgreSQL: FOR UPDATE SKIP LOCKED).

What is not in the log: segments of stolen tags and late segments are written
straight to `visits` by the pipeline, because an alert's trajectory and the
late-read merge read them in the same transaction.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import orjson
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ingest.visits import NO_RSSI, Segments
from registry.db import reading
from registry.models import VisitLog
from registry.sql import executemany

log = logging.getLogger(__name__)

SEGMENT = np.dtype([("tag", "<i8"), ("station", "<i4"), ("first", "<i8"), ("last", "<i8"),
                    ("reads", "<i8"), ("rssi", "<i2")])

# Reads add up; the visit's end and best RSSI only grow. The same text suits SQLite
# and PostgreSQL; `registry.models.Visit` names the columns and the unique key.
UPSERT_VISIT = """INSERT INTO visits (tag, station, first_ms, last_ms, reads, best_rssi)
VALUES ({params}) ON CONFLICT (tag, station, first_ms) DO UPDATE SET
 last_ms = CASE WHEN excluded.last_ms > visits.last_ms THEN excluded.last_ms
           ELSE visits.last_ms END,
 reads = visits.reads + excluded.reads,
 best_rssi = CASE WHEN visits.best_rssi IS NULL THEN excluded.best_rssi
             WHEN excluded.best_rssi > visits.best_rssi THEN excluded.best_rssi
             ELSE visits.best_rssi END"""


def segment_rows(segs: Segments, which: np.ndarray) -> np.ndarray:
    """SEGMENT records of the segments at indices `which`; tags as signed 64-bit."""
    rows = np.empty(len(which), dtype=SEGMENT)
    rows["tag"] = segs.tag[which].view(np.int64)  # same 64 bits (registry.tags)
    rows["station"] = segs.station[which]
    rows["first"] = segs.first_ms[which]
    rows["last"] = segs.last_ms[which]
    rows["reads"] = segs.reads[which]
    rows["rssi"] = segs.best_rssi[which]
    return rows


def pack(rows: np.ndarray, names: list[str]) -> dict[str, object]:
    """A log row from segments (SEGMENT records) and the station names they index."""
    used = np.unique(rows["station"])
    remap = np.zeros(int(used.max()) + 1 if len(used) else 1, dtype=np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    packed = rows.copy()
    packed["station"] = remap[rows["station"]]
    return {"stations": orjson.dumps([names[i] for i in used.tolist()]).decode(),
            "segments": packed.tobytes()}


async def upsert_segments(conn: AsyncConnection, rows: np.ndarray, names: list[str]) -> int:
    """Merge segments of the same visit, then upsert them; returns rows written."""
    if not len(rows):
        return 0
    order = np.lexsort((rows["first"], rows["station"], rows["tag"]))
    r = rows[order]
    cut = np.ones(len(r), dtype=np.bool_)
    cut[1:] = ((r["tag"][1:] != r["tag"][:-1]) | (r["station"][1:] != r["station"][:-1])
               | (r["first"][1:] != r["first"][:-1]))
    start = np.flatnonzero(cut)
    last = np.maximum.reduceat(r["last"], start)
    reads = np.add.reduceat(r["reads"], start)
    rssi = np.maximum.reduceat(r["rssi"], start)
    first = r[start]
    await executemany(conn, UPSERT_VISIT, list(zip(
        first["tag"].tolist(), [names[s] for s in first["station"].tolist()],
        first["first"].tolist(), last.tolist(), reads.tolist(),
        [None if x == NO_RSSI else x for x in rssi.tolist()], strict=True)))
    return len(start)


async def materialize(engine: AsyncEngine, most_segments: int = 20_000,
                      upto: int | None = None) -> int:
    """Fold the oldest log rows (to id `upto`, where given) into `visits`; returns how
    many log rows were applied.

    One transaction takes log rows until they hold `most_segments` segments: on
    SQLite it holds the only write lock, so it must stay short (about 0.1 to
    0.3 s here) or the hot path stalls behind it, stops acknowledging, and the
    broker drops the connection for its keep-alive."""
    async with engine.begin() as conn:
        oldest = select(VisitLog.id, VisitLog.stations, VisitLog.segments)
        if upto is not None:
            oldest = oldest.where(VisitLog.id <= upto)
        candidates = (await conn.execute(
            oldest.order_by(VisitLog.id).limit(100).with_for_update(skip_locked=True))).all()
        logged: list[Any] = []
        total = 0
        for row in candidates:
            if logged and total + len(row.segments) // SEGMENT.itemsize > most_segments:
                break
            logged.append(row)
            total += len(row.segments) // SEGMENT.itemsize
        if not logged:
            return 0
        index: dict[str, int] = {}
        parts = []
        for row in logged:
            local = orjson.loads(row.stations)
            ids = np.array([index.setdefault(s, len(index)) for s in local], dtype=np.int32)
            seg = np.frombuffer(row.segments, dtype=SEGMENT).copy()
            seg["station"] = ids[seg["station"]] if len(ids) else seg["station"]
            parts.append(seg)
        names = list(index)
        written = await upsert_segments(conn, np.concatenate(parts), names)
        await conn.execute(delete(VisitLog).where(VisitLog.id.in_([r.id for r in logged])))
    log.debug("materialized %d log rows into %d visit rows", len(logged), written)
    return len(logged)


async def newest_logged(engine: AsyncEngine) -> int | None:
    """The id of the newest log row, None if the log is empty."""
    async with reading(engine).connect() as conn:
        return (await conn.execute(select(func.max(VisitLog.id)))).scalar()


async def drain(engine: AsyncEngine) -> None:
    """Apply the whole log (at start-up after a crash, and at shutdown)."""
    while await materialize(engine):
        pass
