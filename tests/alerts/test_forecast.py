"""Where a stolen bike goes next: the learned ranking and its geometric fallback."""

from __future__ import annotations

import numpy as np
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.forecast import MAX_GAP_MS, Forecast, learn_from_history
from registry.models import Visit
from registry.stations import StationInfo

# A crossroads: W - X - E on a west-east road, N north of X, S south of X; F far east.
COORDS = {"W": (28.70, 121.50), "X": (28.70, 121.51), "E": (28.70, 121.52),
          "N": (28.71, 121.51), "S": (28.69, 121.51), "F": (28.70, 121.60)}
NAMES = tuple(sorted(COORDS))
DIRECTORY = {s: StationInfo(s, s, lat, lon, "z", True) for s, (lat, lon) in COORDS.items()}


def _learn(trips: list[list[str]], gap_ms: int = 60_000) -> Forecast:
    tag, station, first, last = [], [], [], []
    for t, trip in enumerate(trips):
        for i, s in enumerate(trip):
            tag.append(t)
            station.append(NAMES.index(s))
            first.append(i * (gap_ms + 30_000))
            last.append(i * (gap_ms + 30_000) + 30_000)
    return Forecast.learn(np.array(tag), np.array(station), np.array(first), np.array(last),
                          NAMES, DIRECTORY)


class TestLearned:
    def test_the_way_in_tells_the_way_out(self) -> None:
        # from the west most go on east, some turn north; from the south all go north
        model = _learn([["W", "X", "E"]] * 8 + [["W", "X", "N"]] * 4 + [["S", "X", "N"]] * 6)
        assert model.next_stations("W", "X")[:2] == ["E", "N"]
        assert model.next_stations("S", "X")[0] == "N"
        # without the way in: all transitions out of X, most seen first
        assert model.next_stations(None, "X")[:2] == ["N", "E"]

    def test_thin_history_is_not_ranked_and_long_gaps_are_two_trips(self) -> None:
        sparse = _learn([["W", "X", "S"]] * 2)  # seen twice: too thin to trust
        assert sparse.next_stations("W", "X") == ["E", "F"]  # ahead of a bike going east
        gaps = _learn([["W", "X", "S"]] * 5, gap_ms=MAX_GAP_MS + 1)
        assert gaps.first == {} and gaps.second == {}


class TestFallback:
    def test_nearest_ahead_then_nearest_of_all(self) -> None:
        model = _learn([])
        assert model.next_stations("W", "X") == ["E", "F"]  # N and S are 90 deg off east
        assert model.next_stations("S", "X") == ["N"]
        assert model.next_stations(None, "W")[0] == "X"
        assert model.next_stations(None, "nowhere") == []


async def test_learned_from_the_store_a_chunk_at_a_time(engine: AsyncEngine) -> None:
    """The stored visits, read a few rows at a time, give the model the arrays give."""
    trips = [["W", "X", "E"]] * 8 + [["W", "X", "N"]] * 4 + [["S", "X", "N"]] * 6
    base = 1_700_000_000_000
    rows = [{"tag": t, "station": s, "first_ms": base + i * 90_000,
             "last_ms": base + i * 90_000 + 30_000, "reads": 1, "best_rssi": None}
            for t, trip in enumerate(trips) for i, s in enumerate(trip)]
    async with engine.begin() as conn:
        await conn.execute(insert(Visit), rows)
    expected = _learn(trips)
    for chunk in (7, 1_000):  # many chunks, one chunk
        model = await learn_from_history(engine, DIRECTORY, base + 3_600_000, chunk=chunk)
        assert model.names == NAMES
        assert (model.first, model.second) == (expected.first, expected.second)
        assert model.next_stations("W", "X")[:2] == ["E", "N"]
