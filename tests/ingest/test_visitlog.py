"""The visit log: segments committed with their batches, folded into visits exactly once."""

from __future__ import annotations

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.visitlog import NO_RSSI, SEGMENT, drain, materialize, newest_logged, pack
from registry.models import Visit, VisitLog


def _rows(*segs: tuple[int, int, int, int, int, int]) -> np.ndarray:
    return np.array(list(segs), dtype=SEGMENT)


async def _log(engine: AsyncEngine, rows: np.ndarray, names: list[str]) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(VisitLog).values(**pack(rows, names)))


async def _visits(engine: AsyncEngine) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(
            select(Visit.tag, Visit.station, Visit.first_ms, Visit.last_ms, Visit.reads,
                   Visit.best_rssi).order_by(Visit.tag, Visit.first_ms))]


class TestMaterialize:
    async def test_segments_of_one_visit_merge_across_log_rows(self, engine: AsyncEngine) -> None:
        names = ["A", "B", "C"]
        await _log(engine, _rows((7, 2, 1000, 2000, 3, -60), (8, 0, 1000, 1000, 1, NO_RSSI)),
                   names)
        await _log(engine, _rows((7, 2, 1000, 5000, 2, -50), (-1, 1, 10, 20, 4, -70)), names)
        assert await materialize(engine) == 2
        assert await _visits(engine) == [
            (-1, "B", 10, 20, 4, -70), (7, "C", 1000, 5000, 5, -50), (8, "A", 1000, 1000, 1, None)]
        async with engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(VisitLog))).scalar() == 0
        assert await materialize(engine) == 0  # applied once: nothing left to apply

    async def test_later_log_rows_extend_a_stored_visit(self, engine: AsyncEngine) -> None:
        await _log(engine, _rows((7, 0, 1000, 2000, 3, -60)), ["A"])
        await materialize(engine)
        await _log(engine, _rows((7, 0, 1000, 9000, 2, -65)), ["A"])
        await drain(engine)
        assert await _visits(engine) == [(7, "A", 1000, 9000, 5, -60)]

    async def test_drain_applies_a_long_log_in_bounded_transactions(
            self, engine: AsyncEngine) -> None:
        for i in range(350):
            await _log(engine, _rows((i, 0, 0, 10, 1, -40)), ["A"])
        assert await materialize(engine, most_segments=50) == 50
        await drain(engine)
        visits = await _visits(engine)
        assert len(visits) == 350
        assert sum(v[4] for v in visits) == 350  # type: ignore[misc]

    async def test_a_round_folds_what_was_logged_before_it_began(
            self, engine: AsyncEngine) -> None:
        for i in range(3):
            await _log(engine, _rows((i, 0, 0, 10, 1, -40)), ["A"])
        upto = await newest_logged(engine)
        await _log(engine, _rows((9, 0, 0, 10, 1, -40)), ["A"])  # logged during the round
        assert await materialize(engine, upto=upto) == 3
        assert await materialize(engine, upto=upto) == 0  # the round ends here
        assert [v[0] for v in await _visits(engine)] == [0, 1, 2]
        assert await newest_logged(engine) == (upto or 0) + 1
        await drain(engine)
        assert await newest_logged(engine) is None
