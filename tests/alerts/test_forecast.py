"""Where a stolen bike goes next: the learned ranking and its geometric fallback."""

from __future__ import annotations

import random
from collections import Counter
from itertools import pairwise

from sqlalchemy import delete, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.forecast import MAX_GAP_MS, MIN_SUPPORT, TOP, Forecast, learn_from_history
from registry.models import Visit
from registry.stations import StationInfo

# A crossroads: W - X - E on a west-east road, N north of X, S south of X; F far east.
COORDS = {"W": (28.70, 121.50), "X": (28.70, 121.51), "E": (28.70, 121.52),
          "N": (28.71, 121.51), "S": (28.69, 121.51), "F": (28.70, 121.60)}
NAMES = tuple(sorted(COORDS))
DIRECTORY = {s: StationInfo(s, s, lat, lon, "z", True) for s, (lat, lon) in COORDS.items()}
BASE = 1_700_000_000_000
NOW = BASE + 3_600_000
Row = tuple[int, str, int, int]  # tag, station, first_ms, last_ms


def _trips(trips: list[list[str]], gap_ms: int = 60_000) -> list[Row]:
    step = gap_ms + 30_000
    return [(t, s, BASE + i * step, BASE + i * step + 30_000)
            for t, trip in enumerate(trips) for i, s in enumerate(trip)]


async def _learn(engine: AsyncEngine, visits: list[Row]) -> Forecast:
    async with engine.begin() as conn:
        await conn.execute(delete(Visit))
        if visits:
            await conn.execute(insert(Visit), [
                {"tag": t, "station": s, "first_ms": f, "last_ms": last, "reads": 1,
                 "best_rssi": None} for t, s, f, last in visits])
    return await learn_from_history(engine, DIRECTORY, NOW)


class TestLearned:
    async def test_the_way_in_tells_the_way_out(self, engine: AsyncEngine) -> None:
        # from the west most go on east, some turn north; from the south all go north
        model = await _learn(engine, _trips(
            [["W", "X", "E"]] * 8 + [["W", "X", "N"]] * 4 + [["S", "X", "N"]] * 6))
        assert model.names == NAMES
        assert model.next_stations("W", "X")[:2] == ["E", "N"]
        assert model.next_stations("S", "X")[0] == "N"
        # without the way in: all transitions out of X, most seen first
        assert model.next_stations(None, "X")[:2] == ["N", "E"]

    async def test_thin_history_is_not_ranked_and_long_gaps_are_two_trips(
            self, engine: AsyncEngine) -> None:
        sparse = await _learn(engine, _trips([["W", "X", "S"]] * 2))  # too thin to trust
        assert sparse.next_stations("W", "X") == ["E", "F"]  # ahead of a bike going east
        gaps = await _learn(engine, _trips([["W", "X", "S"]] * 5, gap_ms=MAX_GAP_MS + 1))
        assert gaps.first == {} and gaps.second == {}

    async def test_the_database_counts_what_a_plain_reading_of_the_rule_counts(
            self, engine: AsyncEngine) -> None:
        """Random histories (stays at one station, long gaps, bikes interleaved in
        time) against the rule written out longhand below."""
        rng = random.Random(5)
        for _ in range(12):
            visits: list[Row] = []
            for tag in range(rng.randint(1, 30)):
                t = BASE + rng.randint(0, 600_000)
                for _ in range(rng.randint(1, 12)):
                    last = t + rng.randint(0, 60_000)
                    visits.append((tag, rng.choice("WXENS"), t, last))
                    t = last + rng.choice([1, 60_000, MAX_GAP_MS, MAX_GAP_MS + 1])
            rng.shuffle(visits)
            model = await _learn(engine, visits)
            assert (model.first, model.second) == _longhand(visits, model.index)


class TestFallback:
    async def test_nearest_ahead_then_nearest_of_all(self, engine: AsyncEngine) -> None:
        model = await _learn(engine, [])
        assert model.next_stations("W", "X") == ["E", "F"]  # N and S are 90 deg off east
        assert model.next_stations("S", "X") == ["N"]
        assert model.next_stations(None, "W")[0] == "X"
        assert model.next_stations(None, "nowhere") == []


def _longhand(visits: list[Row], index: dict[str, int],
              ) -> tuple[dict[int, list[int]], dict[tuple[int, int], list[int]]]:
    """The forecast's rule, one bike at a time: consecutive visits at two stations, at
    most MAX_GAP_MS apart, are a transition; two in a row, a second-order one."""
    first: Counter[tuple[int, int]] = Counter()
    second: Counter[tuple[tuple[int, int], int]] = Counter()
    for tag in {v[0] for v in visits}:
        mine = sorted((f, last, index[s]) for t, s, f, last in visits if t == tag)
        moved = [a[2] != b[2] and b[0] - a[1] <= MAX_GAP_MS for a, b in pairwise(mine)]
        for i, ok in enumerate(moved):
            if ok:
                first[mine[i][2], mine[i + 1][2]] += 1
                if i and moved[i - 1]:
                    second[(mine[i - 1][2], mine[i][2]), mine[i + 1][2]] += 1

    def ranked(counts: Counter[tuple[object, int]]) -> dict[object, list[int]]:
        out: dict[object, list[int]] = {}
        for (src, dst), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][1])):
            if n >= MIN_SUPPORT and len(out.setdefault(src, [])) < TOP:
                out[src].append(dst)
        return {k: v for k, v in out.items() if v}

    return ranked(first), ranked(second)  # type: ignore[arg-type, return-value]
