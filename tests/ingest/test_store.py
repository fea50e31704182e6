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
from ingest.pipeline import Inbound
from registry.models import Alert, Station
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
