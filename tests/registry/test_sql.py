"""Many rows in one statement (registry.sql): what goes in is what is stored, on both
databases, whatever the values."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.visitlog import UPSERT_VISIT
from registry.models import SeenBatch, Visit
from registry.sql import executemany, insert_new_keys

INT64 = st.integers(-(2**63), 2**63 - 1)
STATION = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                  min_size=1, max_size=64)
READS = st.integers(1, 2**30 - 1)  # twice this still fits an INTEGER
VISIT = st.tuples(INT64, STATION, INT64, INT64, READS, st.none() | st.integers(-128, 127))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(VISIT, min_size=1, max_size=40,
                     unique_by=lambda r: (r[0], r[1], r[2])))
async def test_visits_upserted_are_the_rows_given(engine: AsyncEngine,
                                                  rows: list[tuple[object, ...]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(Visit))
        await conn.run_sync(executemany, UPSERT_VISIT, rows)
        stored = (await conn.execute(select(
            Visit.tag, Visit.station, Visit.first_ms, Visit.last_ms, Visit.reads,
            Visit.best_rssi))).all()
        assert sorted(map(tuple, stored), key=repr) == sorted(rows, key=repr)
        await conn.run_sync(executemany, UPSERT_VISIT, rows)  # the same again: reads add up
        reads = {(r.tag, r.station, r.first_ms): r.reads for r in (await conn.execute(
            select(Visit.tag, Visit.station, Visit.first_ms, Visit.reads))).all()}
        assert reads == {(r[0], r[1], r[2]): 2 * r[4] for r in rows}  # type: ignore[operator]


@pytest.mark.parametrize("repeat", [False, True])
async def test_new_keys_are_those_not_stored_before(engine: AsyncEngine, repeat: bool) -> None:
    first = [("S-1", 7, seq, 1_000 + seq) for seq in range(50)] + [("S-'2\"", -1, 2**40, 5)]
    async with engine.begin() as conn:
        assert await conn.run_sync(insert_new_keys, first) == {k[:3] for k in first}
        again = first[:10] if repeat else []
        later = [("S-1", 7, seq, 9_000) for seq in range(50, 60)]
        # A key seen before, offered again with another receive time, is not new.
        offered = [(s, b, q, 9_000) for s, b, q, _ in again] + later
        assert await conn.run_sync(insert_new_keys, offered) == {k[:3] for k in later}
        assert (await conn.execute(select(SeenBatch))).all().__len__() == 61
