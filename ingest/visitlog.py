"""The visit log: how a group's visits become durable cheaply, then queryable.

Upserting visits row by row into a table indexed by tag costs SQLite 5 to 30
µs a row (random B-tree inserts, measured), far too much for every read of a
busy town. So the hot path appends the group's visit segments to `visit_log`
as one packed row, in the same transaction as the dedupe keys: that is the
durable effect the broker's acknowledgement waits for (DESIGN.md decision 3).

The materializer then folds the log into `visits` in the background, in two
steps, each a transaction of its own (`fold`):

    merge   the oldest log rows, many groups' worth, are replaced by rows holding
            one segment per visit (a bike in range for a minute is one row, not
            sixty), in key order, at most CHUNK_VISITS a row
    apply   each such row is upserted into `visits` and deleted

A merged row is an ordinary log row, so a crash anywhere applies each log row
exactly once, and what a crash leaves after a merge is merged again or applied
by the next round. Upserts add reads and take maxima, so log rows may be
applied in any order, by any worker: each step deletes the rows it takes
before it writes, and finding one gone (another worker took it) it writes
nothing.

On SQLite every write transaction holds the database's one write lock, the hot
path's included; the two steps keep each hold short (see `fold`).

What is not in the log: segments of stolen tags and late segments are written
straight to `visits` by the pipeline, because an alert's trajectory and the
late-read merge read them in the same transaction.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.visits import NO_RSSI, Segments
from registry.db import in_transaction, reading, write_turn
from registry.models import VisitLog
from registry.sql import executemany

log = logging.getLogger(__name__)

CHUNK_VISITS = 500  # visits upserted a transaction: about 3 ms of SQLite's write lock

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


def merge_segments(rows: np.ndarray) -> np.ndarray:
    """One SEGMENT record per visit (tag, station, first), in that order: reads added,
    last and best RSSI the greatest."""
    order = np.lexsort((rows["first"], rows["station"], rows["tag"]))
    r = rows[order]
    cut = np.ones(len(r), dtype=np.bool_)
    cut[1:] = ((r["tag"][1:] != r["tag"][:-1]) | (r["station"][1:] != r["station"][:-1])
               | (r["first"][1:] != r["first"][:-1]))
    start = np.flatnonzero(cut)
    merged = r[start]
    if len(start):
        merged["last"] = np.maximum.reduceat(r["last"], start)
        merged["reads"] = np.add.reduceat(r["reads"], start)
        merged["rssi"] = np.maximum.reduceat(r["rssi"], start)
    return merged


def upsert_segments(conn: Connection, rows: np.ndarray, names: list[str]) -> int:
    """Merge segments of the same visit, then upsert them; returns rows written."""
    return _upsert_merged(conn, merge_segments(rows), names)


def _upsert_merged(conn: Connection, m: np.ndarray, names: list[str]) -> int:
    """Upsert segments merged already, one per visit; returns rows written."""
    if not len(m):
        return 0
    executemany(conn, UPSERT_VISIT, list(zip(
        m["tag"].tolist(), [names[s] for s in m["station"].tolist()], m["first"].tolist(),
        m["last"].tolist(), m["reads"].tolist(),
        [None if x == NO_RSSI else x for x in m["rssi"].tolist()], strict=True)))
    return len(m)


def _merge_rows(logged: list[Any], chunk_visits: int, packed: bool,
                ) -> tuple[list[np.ndarray], list[str], list[dict[str, object]]]:
    """Log rows' segments merged, one per visit, in chunks of at most `chunk_visits`;
    the station names they index; and, if `packed`, the chunks packed as log rows."""
    index: dict[str, int] = {}
    merged = merge_segments(np.concatenate([_segments(row, index) for row in logged]))
    names = list(index)
    chunks = [merged[i:i + chunk_visits]
              for i in range(0, len(merged), chunk_visits)] or [merged]
    return chunks, names, [pack(c, names) for c in chunks] if packed else []


def _segments(row: Any, index: dict[str, int]) -> np.ndarray:
    """A log row's SEGMENT records, stations renumbered into `index` (extended)."""
    local = orjson.loads(row.stations)
    ids = np.array([index.setdefault(s, len(index)) for s in local], dtype=np.int32)
    seg = np.frombuffer(row.segments, dtype=SEGMENT).copy()
    if len(ids):
        seg["station"] = ids[seg["station"]]
    return seg


@dataclass(frozen=True, slots=True)
class Logged:
    """A log row, as `fold` holds it between its transactions."""

    log_id: int
    rows: np.ndarray  # SEGMENT records, one per visit (merged)
    names: list[str]  # the stations they index


async def merge_oldest(engine: AsyncEngine, most_segments: int = 20_000,
                       upto: int | None = None, chunk_visits: int = CHUNK_VISITS,
                       ) -> list[Logged]:
    """Replace the oldest log rows (to id `upto`, where given), up to `most_segments`
    segments, by rows of at most `chunk_visits` merged visits; returns the new rows,
    [] when there was nothing to merge.

    The log is read and merged outside any write transaction; only the swap (a
    delete and a few blob inserts, a few ms) takes `write_turn` and SQLite's write lock.
    A row merged already, or as good as (one row, few segments), is returned as is."""
    while True:
        async with reading(engine).connect() as conn:
            oldest = select(VisitLog.id, VisitLog.stations, VisitLog.segments)
            if upto is not None:
                oldest = oldest.where(VisitLog.id <= upto)
            candidates = (await conn.execute(oldest.order_by(VisitLog.id).limit(100))).all()
        logged: list[Any] = []
        total = 0
        for row in candidates:
            if logged and total + len(row.segments) // SEGMENT.itemsize > most_segments:
                break
            logged.append(row)
            total += len(row.segments) // SEGMENT.itemsize
        if not logged:
            return []
        # In a thread: a merge of 20,000 segments took up to 10 ms of the event loop,
        # which the hot path waited for; numpy lets go of the interpreter's lock for
        # nearly all of it, and the loop went on with gaps under 1 ms (measured).
        lone = len(logged) == 1 and total <= chunk_visits  # kept as it is, merged
        chunks, names, packed = await asyncio.to_thread(_merge_rows, logged, chunk_visits,
                                                        not lone)
        if lone:
            return [Logged(logged[0].id, chunks[0], names)]
        async with write_turn(engine):
            ids = await in_transaction(engine, _swap, [r.id for r in logged], packed)
        if ids is None:  # another worker took some: read again
            continue
        log.debug("merged %d log rows (%d segments) into %d rows of %d visits", len(logged),
                  total, len(ids), sum(len(c) for c in chunks))
        return [Logged(i, c, names) for i, c in zip(ids, chunks, strict=True)]


def _swap(conn: Connection, logged: list[int], packed: list[dict[str, object]],
          ) -> list[int] | None:
    """Log rows `logged` replaced by `packed`: the new rows' ids, or None (nothing
    changed) if another worker took some of them."""
    gone = conn.execute(delete(VisitLog).where(VisitLog.id.in_(logged)))
    if gone.rowcount != len(logged):
        conn.rollback()
        return None
    return list(conn.execute(
        insert(VisitLog).returning(VisitLog.id, sort_by_parameter_order=True),
        packed).scalars().all())


async def apply_logged(engine: AsyncEngine, row: Logged) -> int:
    """Upsert a log row into `visits` and delete it, in one transaction; returns the
    visit rows written (0 if another worker had it)."""
    return await in_transaction(engine, _apply, row)


def _apply(conn: Connection, row: Logged) -> int:
    gone = conn.execute(delete(VisitLog).where(VisitLog.id == row.log_id))
    if not gone.rowcount:
        return 0
    return _upsert_merged(conn, row.rows, row.names)


async def fold(engine: AsyncEngine, upto: int, most_segments: int = 20_000) -> None:
    """Fold what was logged to id `upto` into `visits`.

    Only that: a round that went on until the log was empty chased the hot path (a
    group's row, a transaction, the next group's row, another); at 2,000 batches/s
    that held SQLite's write lock 12 s in 23, against 2.5 s in rounds of what was
    there (alternated runs).

    Each write transaction is taken inside `write_turn`: the process's lock on SQLite, where
    the hot path takes its turn between two of them. A hot-path transaction behind
    the materializer now waits for one swap or one apply (a few ms); when one
    transaction read, merged and applied, it waited for a whole round's upserts (p50
    35 ms at 3,500 batches/s, measured)."""
    while merged := await merge_oldest(engine, most_segments, upto):
        for row in merged:
            async with write_turn(engine):
                await apply_logged(engine, row)


async def newest_logged(engine: AsyncEngine) -> int | None:
    """The id of the newest log row, None if the log is empty."""
    async with reading(engine).connect() as conn:
        return (await conn.execute(select(func.max(VisitLog.id)))).scalar()


async def drain(engine: AsyncEngine) -> None:
    """Fold what the log holds now (at start-up after a crash, at shutdown, and before
    looking back through the visits); what is logged meanwhile waits for the next round."""
    upto = await newest_logged(engine)
    if upto is not None:
        await fold(engine, upto)
