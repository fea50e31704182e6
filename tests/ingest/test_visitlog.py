"""The visit log: segments committed with their batches, folded into visits exactly once."""

from __future__ import annotations

import asyncio

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.visitlog import (
    NO_RSSI,
    SEGMENT,
    _swap,
    apply_logged,
    drain,
    fold,
    merge_oldest,
    newest_logged,
    pack,
)
from registry.db import in_transaction, open_database
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


async def _log_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(VisitLog))).scalar_one())


def _oracle(logged: list[np.ndarray], names: list[str]) -> list[tuple[object, ...]]:
    """The visits the log rows make, written out longhand."""
    visits: dict[tuple[int, str, int], list[int]] = {}
    for rows in logged:
        for tag, station, first, last, reads, rssi in rows.tolist():
            v = visits.setdefault((tag, names[station], first), [first, 0, NO_RSSI])
            v[0], v[1], v[2] = max(v[0], last), v[1] + reads, max(v[2], rssi)
    return sorted((tag, station, first, last, reads, None if rssi == NO_RSSI else rssi)
                  for (tag, station, first), (last, reads, rssi) in visits.items())


class TestMaterialize:
    async def test_segments_of_one_visit_merge_across_log_rows(self, engine: AsyncEngine) -> None:
        names = ["A", "B", "C"]
        await _log(engine, _rows((7, 2, 1000, 2000, 3, -60), (8, 0, 1000, 1000, 1, NO_RSSI)),
                   names)
        await _log(engine, _rows((7, 2, 1000, 5000, 2, -50), (-1, 1, 10, 20, 4, -70)), names)
        merged = await merge_oldest(engine)
        assert [len(m.rows) for m in merged] == [3]  # four segments, three visits
        assert await _log_count(engine) == 1  # the two rows, swapped for the merged one
        assert await _visits(engine) == []  # nothing applied yet
        await drain(engine)
        assert await _visits(engine) == [
            (-1, "B", 10, 20, 4, -70), (7, "C", 1000, 5000, 5, -50), (8, "A", 1000, 1000, 1, None)]
        assert await _log_count(engine) == 0
        assert await merge_oldest(engine) == []  # applied once: nothing left to apply

    async def test_later_log_rows_extend_a_stored_visit(self, engine: AsyncEngine) -> None:
        await _log(engine, _rows((7, 0, 1000, 2000, 3, -60)), ["A"])
        await drain(engine)
        await _log(engine, _rows((7, 0, 1000, 9000, 2, -65)), ["A"])
        await drain(engine)
        assert await _visits(engine) == [(7, "A", 1000, 9000, 5, -60)]

    async def test_a_merge_is_bounded_and_its_rows_hold_at_most_a_chunk_of_visits(
            self, engine: AsyncEngine) -> None:
        for i in range(350):
            await _log(engine, _rows((i, 0, 0, 10, 1, -40), (i, 0, 0, 20, 1, -40)), ["A"])
        merged = await merge_oldest(engine, most_segments=100, chunk_visits=20)
        assert [len(m.rows) for m in merged] == [20, 20, 10]  # 50 rows of 2 segments
        assert await _log_count(engine) == 300 + 3
        await drain(engine)
        visits = await _visits(engine)
        assert len(visits) == 350
        assert {v[3:5] for v in visits} == {(20, 2)}

    async def test_a_round_folds_what_was_logged_before_it_began(
            self, engine: AsyncEngine) -> None:
        for i in range(3):
            await _log(engine, _rows((i, 0, 0, 10, 1, -40)), ["A"])
        upto = await newest_logged(engine)
        assert upto is not None
        await _log(engine, _rows((9, 0, 0, 10, 1, -40)), ["A"])  # logged during the round
        await fold(engine, upto)
        assert [v[0] for v in await _visits(engine)] == [0, 1, 2]
        assert await _log_count(engine) == 1
        await drain(engine)
        assert await newest_logged(engine) is None

    async def test_a_row_another_worker_applied_is_not_applied_again(
            self, engine: AsyncEngine) -> None:
        await _log(engine, _rows((1, 0, 0, 10, 1, -40), (2, 0, 0, 10, 1, -40)), ["A"])
        await _log(engine, _rows((1, 0, 0, 30, 1, -40)), ["A"])
        merged = await merge_oldest(engine)
        assert [await apply_logged(engine, m) for m in merged] == [2]
        assert [await apply_logged(engine, m) for m in merged] == [0]
        assert await _visits(engine) == [(1, "A", 0, 30, 2, -40), (2, "A", 0, 10, 1, -40)]

    async def test_a_swap_where_another_worker_took_a_row_changes_nothing(
            self, engine: AsyncEngine) -> None:
        await _log(engine, _rows((1, 0, 0, 10, 1, -40)), ["A"])
        await _log(engine, _rows((2, 0, 0, 10, 1, -40)), ["A"])
        async with engine.connect() as conn:
            ids = list((await conn.execute(select(VisitLog.id))).scalars())
        packed = [pack(_rows((1, 0, 0, 10, 1, -40), (2, 0, 0, 10, 1, -40)), ["A"])]
        gone = max(ids) + 1  # taken by another worker meanwhile
        assert await in_transaction(engine, _swap, [*ids, gone], packed) is None
        assert await _log_count(engine) == 2  # the delete rolled back, nothing inserted
        new = await in_transaction(engine, _swap, ids, packed)
        assert new is not None and len(new) == 1 and await _log_count(engine) == 1

    async def test_any_crash_between_transactions_applies_each_segment_once(
            self, engine: AsyncEngine) -> None:
        """Random logs, folded in random steps, with the materializer stopped between
        any two of its transactions (what it held in memory lost): the visits are those
        the log rows make, written out longhand."""
        names = ["A", "B", "C"]
        rng = np.random.default_rng(11)
        logged: list[np.ndarray] = []
        for _ in range(12):  # rounds: log, then a fold that may stop anywhere
            for _ in range(int(rng.integers(1, 6))):
                n = int(rng.integers(1, 40))
                rows = np.zeros(n, dtype=SEGMENT)
                rows["tag"] = rng.integers(-3, 4, n)
                rows["station"] = rng.integers(0, 3, n)
                rows["first"] = rng.choice([0, 60_000], n)
                rows["last"] = rows["first"] + rng.integers(0, 30_000, n)
                rows["reads"] = rng.integers(1, 9, n)
                rows["rssi"] = rng.choice([NO_RSSI, -80, -60, -40], n)
                logged.append(rows)
                await _log(engine, rows, names)
            merged = await merge_oldest(engine, most_segments=int(rng.integers(1, 120)),
                                        chunk_visits=int(rng.integers(1, 30)))
            for m in merged[:int(rng.integers(0, len(merged) + 1))]:  # then it stops
                await apply_logged(engine, m)
        await drain(engine)
        assert await _log_count(engine) == 0
        assert sorted(await _visits(engine)) == _oracle(logged, names)

    async def test_two_workers_folding_at_once_apply_each_segment_once(
            self, engine: AsyncEngine, db_url: str) -> None:
        names = ["A", "B"]
        rng = np.random.default_rng(3)
        logged = []
        for _ in range(60):
            rows = np.zeros(20, dtype=SEGMENT)
            rows["tag"] = rng.integers(0, 30, 20)
            rows["station"] = rng.integers(0, 2, 20)
            rows["last"] = rng.integers(0, 1000, 20)
            rows["reads"] = 1
            rows["rssi"] = -50
            logged.append(rows)
            await _log(engine, rows, names)
        other = await open_database(db_url)
        try:
            await asyncio.gather(*(fold(e, 10**9, most_segments=100)
                                   for e in (engine, other, engine, other)))
        finally:
            await other.dispose()
        assert await _log_count(engine) == 0
        assert sorted(await _visits(engine)) == _oracle(logged, names)
