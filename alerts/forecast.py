"""Where a stolen bike goes next: `next_stations`, most likely first.

Learned from the stored history: every bike's consecutive station visits
(less than `MAX_GAP_MS` apart) are transitions, counted by the database in one
query (`TRANSITIONS`) into first-order (station -> next) and second-order
((previous, station) -> next) tables. A forecast ranks the next stations by
the second-order counts where the pair has been seen `MIN_SUPPORT` times or
more (the way the bike came in tells where it goes out), else by the
first-order counts, and fills what is left with the nearest stations in the
direction of travel (within 60 degrees of the heading; the nearest of all
without one), so thin history still gives an answer. The model is immutable;
the worker builds a new one every `REFRESH_S` and swaps it in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.geo import distance_km_array
from registry.db import reading
from registry.stations import StationInfo, coordinates

MAX_GAP_MS = 30 * 60_000   # visits further apart are two trips, not a transition
MIN_SUPPORT = 3            # transitions seen fewer times than this are too thin to rank by
HISTORY_DAYS = 30
HISTORY_ROWS = 2_000_000   # newest stored visits learned from: bounded time
REFRESH_S = 600.0
CONE_DEG = 60.0
TOP = 3


@dataclass(slots=True, frozen=True)
class Forecast:
    names: tuple[str, ...]       # station index -> id
    index: dict[str, int]        # id -> station index
    first: dict[int, list[int]]  # station -> next stations, most frequent first
    second: dict[tuple[int, int], list[int]]  # (previous, station) -> next stations
    lat: np.ndarray              # by station index; NaN where unknown
    lon: np.ndarray

    @classmethod
    def from_transitions(cls, rows: Sequence[tuple[str | None, str, str, int]],
                         directory: Mapping[str, StationInfo]) -> Forecast:
        """From transition counts: (previous or None, station, next, times seen), where
        a row with a previous counts toward both orders (see `TRANSITIONS`)."""
        names = tuple(sorted(set(directory).union(*((a, b) for _, a, b, _ in rows))))
        index = {name: i for i, name in enumerate(names)}
        n = len(names)
        p = np.array([-1 if r[0] is None else index[r[0]] for r in rows], np.int64)
        a = np.array([index[r[1]] for r in rows], np.int64)
        b = np.array([index[r[2]] for r in rows], np.int64)
        seen = np.array([r[3] for r in rows], np.int64)
        first = _ranked(a, b, seen, n)
        both = p >= 0
        second_flat = _ranked(p[both] * n + a[both], b[both], seen[both], n)
        second = {(k // n, k % n): v for k, v in second_flat.items()}
        lat, lon = coordinates(names, directory)
        return cls(names, index, first, second, lat, lon)

    def next_stations(self, previous: str | None, current: str, k: int = TOP) -> list[str]:
        cur = self.index.get(current)
        if cur is None:
            return []
        prev = self.index.get(previous) if previous is not None else None
        ranked: list[int] = []
        if prev is not None and prev != cur:
            ranked = list(self.second.get((prev, cur), []))
        if not ranked:
            ranked = list(self.first.get(cur, []))
        out = ranked[:k]
        if len(out) < k:
            for near in self.nearest(prev, cur):
                if near not in out:
                    out.append(near)
                if len(out) == k:
                    break
        return [self.names[i] for i in out]

    def nearest(self, prev: int | None, cur: int) -> list[int]:
        """Stations nearest to `cur`, only those ahead when the bike came from `prev`."""
        lat, lon = np.radians(self.lat), np.radians(self.lon)
        dl = lon - lon[cur]
        x = np.sin(dl) * np.cos(lat)
        y = np.cos(lat[cur]) * np.sin(lat) - np.sin(lat[cur]) * np.cos(lat) * np.cos(dl)
        bearing = np.degrees(np.arctan2(x, y)) % 360
        km = distance_km_array(self.lat[cur], self.lon[cur], self.lat, self.lon)
        ok = np.isfinite(km)
        ok[cur] = False
        if prev is not None and np.isfinite(lat[prev]) and prev != cur:
            dlp = lon[cur] - lon[prev]
            heading = np.degrees(np.arctan2(
                np.sin(dlp) * np.cos(lat[cur]),
                np.cos(lat[prev]) * np.sin(lat[cur])
                - np.sin(lat[prev]) * np.cos(lat[cur]) * np.cos(dlp))) % 360
            off = np.abs((bearing - heading + 180) % 360 - 180)
            ok &= off <= CONE_DEG
        candidates = np.flatnonzero(ok)
        return [int(i) for i in candidates[np.argsort(km[candidates], kind="stable")][:TOP]]


def _ranked(src: np.ndarray, dst: np.ndarray, seen: np.ndarray, n_dst: int,
            ) -> dict[int, list[int]]:
    """For each source, its destinations seen `MIN_SUPPORT` times or more, most first
    (then by index: the order of the names)."""
    if not len(src):
        return {}
    pairs, inverse = np.unique(src * n_dst + dst, return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=seen).astype(np.int64)
    keep = counts >= MIN_SUPPORT
    pairs, counts = pairs[keep], counts[keep]
    s, d = pairs // n_dst, pairs % n_dst
    order = np.lexsort((d, -counts, s))  # by source, then most seen, then index
    out: dict[int, list[int]] = {}
    for si, di in zip(s[order].tolist(), d[order].tolist(), strict=True):
        lst = out.setdefault(si, [])
        if len(lst) < TOP:
            lst.append(di)
    return out


EMPTY = Forecast((), {}, {}, {}, np.empty(0), np.empty(0))


# Every bike's consecutive visits, counted by the database: (previous, station, next)
# where the visit before `station` was a transition too, else (NULL, station, next).
# Two million visits turned into Python rows and numpy arrays every REFRESH_S held
# the interpreter's lock for most of 25 s and peaked at 290 MB more; here they stay
# in the database, which sorts them in bounded memory without that lock, and a few
# thousand counts come back. The newest stored visits are the newest ids, a range
# of the primary key: newest by first_ms cost SQLite a sort of its own, 13 s of 25.
# The window orders ties fully, so that any two databases count the same.
TRANSITIONS = text("""
WITH recent AS (
  SELECT tag, station, first_ms, last_ms FROM visits
  WHERE id > (SELECT max(id) FROM visits) - :most AND first_ms >= :since),
steps AS (
  SELECT station AS b, first_ms,
         LAG(station, 1) OVER w AS a, LAG(first_ms, 1) OVER w AS a_first,
         LAG(last_ms, 1) OVER w AS a_last,
         LAG(station, 2) OVER w AS p, LAG(last_ms, 2) OVER w AS p_last
  FROM recent WINDOW w AS (PARTITION BY tag ORDER BY first_ms, last_ms, station))
SELECT CASE WHEN p <> a AND a_first - p_last <= :gap THEN p END AS p, a, b, COUNT(*) AS n
FROM steps WHERE a <> b AND first_ms - a_last <= :gap
GROUP BY 1, 2, 3""")


async def learn_from_history(engine: AsyncEngine, directory: Mapping[str, StationInfo],
                             now_ms: int) -> Forecast:
    """The model from the newest stored visits: the last HISTORY_ROWS stored, of those
    that began in the last HISTORY_DAYS."""
    async with reading(engine).connect() as conn:
        rows = (await conn.execute(TRANSITIONS, {
            "since": now_ms - HISTORY_DAYS * 86_400_000, "most": HISTORY_ROWS,
            "gap": MAX_GAP_MS})).all()
    return Forecast.from_transitions([(r.p, r.a, r.b, r.n) for r in rows], directory)
