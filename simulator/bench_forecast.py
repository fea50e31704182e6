"""How well `next_stations` predicts, on a simulated town of commuters.

Bikes ride between a home and a work crossing of an 8x8 street grid, along one
of the two L-shaped routes (each bike keeps its habit), with a random detour at
15% of crossings. The first 70% of every bike's trips are the history the
forecast learns from; on the rest, for every (previous, current, next)
station of a ride, the figure is how often the station reached next is the
first of `next_stations`, or among the first three. Beside it, in the same
run, the two baselines: the nearest stations, and the nearest stations ahead
of the bike (the forecast's own fallback, with no history). The history goes
through a SQLite database and the worker's own learning (`learn_from_history`).
"""

from __future__ import annotations

import tempfile

import numpy as np
from sqlalchemy import insert

from alerts.forecast import Forecast, learn_from_history
from registry.db import open_database
from registry.models import Visit
from registry.stations import StationInfo
from simulator.report import Report
from simulator.roads import Grid

TRIPS = 10
TRAIN_SHARE = 0.7
DETOUR = 0.15


def _ride(grid: Grid, a: int, b: int, rows_first: bool, rng: np.random.Generator) -> list[int]:
    path, cur, came = [a], a, -1
    while cur != b and len(path) < 4 * (grid.rows + grid.cols):
        r, c = grid.rc(cur)
        rb, cb = grid.rc(b)
        if rng.random() < DETOUR:  # any street but the one it came by
            choices = [n for n in grid.neighbours(cur) if n != came] or grid.neighbours(cur)
            nxt = choices[int(rng.integers(0, len(choices)))]
        elif (rows_first and r != rb) or c == cb:
            nxt = cur + grid.cols * (1 if rb > r else -1)
        else:
            nxt = cur + (1 if cb > c else -1)
        path.append(nxt)
        came, cur = cur, nxt
    return path


async def evaluate(bikes: int, seed: int = 11) -> dict[str, tuple[float, float]]:
    """top-1 and top-3 hit rates of the forecast and the two baselines."""
    grid = Grid(8, 8, block_m=400.0)  # a station at every crossing
    rng = np.random.default_rng(seed)
    n = grid.nodes
    names = tuple(f"SP-{i:04d}" for i in range(n))
    directory = {sid: StationInfo(sid, sid, *grid.latlon(i), grid.zone(i), True)
                 for i, sid in enumerate(names)}
    train: list[tuple[int, int, int, int]] = []  # tag, station, first_ms, last_ms
    test: list[list[int]] = []
    for bike in range(bikes):
        home, work = rng.choice(n, 2, replace=False)
        rows_first = bool(rng.random() < 0.5)
        t = 0
        for trip in range(TRIPS):
            a, b = (home, work) if trip % 2 == 0 else (work, home)
            path = _ride(grid, int(a), int(b), rows_first, rng)
            if trip < TRIPS * TRAIN_SHARE:
                for node in path:
                    train.append((bike, node, t, t + 20_000))
                    t += 80_000  # 400 m at 18 km/h
            else:
                test.append(path)
            t += 8 * 3_600_000  # the next trip is hours later
    learned = await _learn(train, names, directory, now_ms=max(v[2] for v in train) + 1)
    geometry = Forecast.from_transitions([], directory)
    hits = {"forecast": [0, 0], "nearest ahead": [0, 0], "nearest": [0, 0]}
    total = 0
    for path in test:
        for prev, cur, nxt in zip(path, path[1:], path[2:], strict=False):
            total += 1
            want = names[nxt]
            for name, ranked in (
                    ("forecast", learned.next_stations(names[prev], names[cur])),
                    ("nearest ahead", geometry.next_stations(names[prev], names[cur])),
                    ("nearest", [names[i] for i in geometry.nearest(None, cur)])):
                hits[name][0] += ranked[:1] == [want]
                hits[name][1] += want in ranked[:3]
    return {name: (h1 / total, h3 / total) for name, (h1, h3) in hits.items()}


async def _learn(train: list[tuple[int, int, int, int]], names: tuple[str, ...],
                 directory: dict[str, StationInfo], now_ms: int) -> Forecast:
    with tempfile.TemporaryDirectory() as tmp:
        engine = await open_database(f"sqlite+aiosqlite:///{tmp}/forecast.db")
        try:
            async with engine.begin() as conn:
                await conn.execute(insert(Visit), [
                    {"tag": bike, "station": names[node], "first_ms": first, "last_ms": last,
                     "reads": 1, "best_rssi": None} for bike, node, first, last in train])
            return await learn_from_history(engine, directory, now_ms)
        finally:
            await engine.dispose()


async def bench_forecast(quick: bool, report: Report) -> None:
    bikes = 300 if quick else 3_000
    print(f"\n== next_stations on a simulated town: {bikes:,} commuters, 8x8 crossings, "
          f"{DETOUR:.0%} detours; learned on {TRAIN_SHARE:.0%} of the trips ==")
    print(f"{'ranking':>14} {'top-1':>7} {'top-3':>7}")
    scores = await evaluate(bikes)
    for name, (top1, top3) in scores.items():
        print(f"{name:>14} {top1:>7.1%} {top3:>7.1%}")
    for k, rank in (("top-1", 0), ("top-3", 1)):
        report.add("next_stations", f"forecast {k} hit rate", scores["forecast"][rank] * 100,
                   "%", scores["nearest ahead"][rank] * 100, "nearest stations ahead")
