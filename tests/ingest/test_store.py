"""A group is decoded once, outside the write turn, and stored as often as the database
needs (Pipeline.decode, Pipeline.store): a retried transaction counts everything once,
and writes again what the failed one had written and rolled back: its alerts, the
stations it recorded as unknown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from ingest.broker import BrokerHandle
from ingest.clock import wall_ms
from ingest.codec import encode_binary
from ingest.pipeline import Inbound
from ingest.visitlog import drain
from registry.models import Alert, Station, Visit
from tests.helpers import STOLEN
from tests.ingest.test_express import THEFT_SEEN, Traffic, _worker


async def test_a_retried_group_counts_once(broker: BrokerHandle, tmp_path: Path) -> None:
    w = await _worker(broker, f"sqlite+aiosqlite:///{tmp_path}/store.db")
    try:
        t = Traffic(w.settings.mqtt_root)
        t.crowd(5)
        stored = t.msgs[0]
        await w.pipeline.process([stored])
        # Sent again and received later: a repeat that the database, not the memory
        # window, finds.
        w.pipeline._seen.clear()
        again = Inbound(stored.topic, stored.payload, 98, 1, stored.received_ms + 1000)
        t.batch(THEFT_SEEN, [STOLEN])
        bad = Inbound(stored.topic, b"BW\x01", 99, 1, t.now)
        group = [again, *t.msgs[1:], bad]
        decoded = w.pipeline.decode(group)

        reads, failed = w.pipeline._reads, list[bool]()

        def fail_once(*args: Any) -> None:
            reads(*args)  # the result is filled in, then the transaction fails
            if not failed:
                failed.append(True)
                raise OperationalError("COMMIT", {}, Exception("database is locked"))

        w.pipeline._reads = fail_once  # type: ignore[method-assign,assignment]
        with pytest.raises(OperationalError):
            await w.pipeline.store(decoded)
        result = await w.pipeline.store(decoded)
        assert (result.received, result.batches, result.duplicates) == (len(group), 5, 1)
        assert result.rejected == {"bad_binary": 1} and len(result.alerts) == 1
        async with w.engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(Alert))).scalar() == 1
            unknown = set((await conn.execute(
                select(Station.id).where(Station.imported.is_(False)))).scalars())
        assert unknown == {f"X-{i}" for i in range(5)}  # PROTOCOL.md 1: recorded as unknown
    finally:
        await w.engine.dispose()


async def test_late_reads_fold_into_the_stored_visit_their_time_falls_in(
        broker: BrokerHandle, tmp_path: Path) -> None:
    """PROTOCOL.md section 3: reads older than the tag's open visit (a station that was
    cut off) go into the stored visit of their station their time falls in, within the
    gap, else into a visit of their own; several tags' in one group."""
    w = await _worker(broker, f"sqlite+aiosqlite:///{tmp_path}/late.db")
    gap = w.pipeline.tracker.gap_ms
    t0 = wall_ms() - 10 * gap
    seq = iter(range(1, 100))

    def batch(station: str, at: int, tags: list[int]) -> Inbound:
        return Inbound(f"{w.settings.mqtt_root}/stations/{station}/reads",
                       encode_binary(7, next(seq), at, tags, [0] * len(tags)), 1, 1, at)

    try:
        await w.pipeline.process([batch("SP-0040", t0, [5, 6, 8]),
                                  batch("SP-0041", t0 + 3 * gap, [5]),
                                  batch("SP-0041", t0 + 3 * gap + 1000, [5])])
        await w.pipeline.process([batch("SP-0040", t0 + 3 * gap // 2, [8])])  # another
        await w.pipeline.process([batch("SP-0042", t0 + 5 * gap, [5, 6, 8])])  # open now
        await drain(w.engine)  # in `visits`, where late reads look
        late = await w.pipeline.process([
            batch("SP-0040", t0 + gap // 2, [5]),      # within the gap of its visit at t0
            batch("SP-0041", t0 + 2 * gap - 1, [6]),   # none of its own there: a new one
            batch("SP-0040", t0 + 3 * gap // 4, [8])])  # near two: the earlier
        assert (late.batches, late.reads, late.duplicates) == (3, 3, 0)
        async with w.engine.connect() as conn:
            visits = (await conn.execute(
                select(Visit.tag, Visit.station, Visit.first_ms - t0, Visit.last_ms - t0,
                       Visit.reads).order_by(Visit.tag, Visit.first_ms))).all()
        assert [tuple(v) for v in visits] == [
            (5, "SP-0040", 0, gap // 2, 2),
            (5, "SP-0041", 3 * gap, 3 * gap + 1000, 2),
            (5, "SP-0042", 5 * gap, 5 * gap, 1),
            (6, "SP-0040", 0, 0, 1),
            (6, "SP-0041", 2 * gap - 1, 2 * gap - 1, 1),
            (6, "SP-0042", 5 * gap, 5 * gap, 1),
            (8, "SP-0040", 0, 3 * gap // 4, 2),
            (8, "SP-0040", 3 * gap // 2, 3 * gap // 2, 1),
            (8, "SP-0042", 5 * gap, 5 * gap, 1)]
    finally:
        await w.engine.dispose()
