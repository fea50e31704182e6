"""Where a stolen bike goes next: `next_stations`, most likely first.

Learned from the stored history: every bike's consecutive station visits
(less than `MAX_GAP_MS` apart) are transitions, counted in one pass of array
operations into first-order (station -> next) and second-order
((previous, station) -> next) tables. A forecast ranks the next stations by
the second-order counts where the pair has been seen `MIN_SUPPORT` times or
more (the way the bike came in tells where it goes out), else by the
first-order counts, and fills what is left with the nearest stations in the
direction of travel (within 60 degrees of the heading; the nearest of all
without one), so thin history still gives an answer. The model is immutable;
the worker builds a new one every `REFRESH_S` and swaps it in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.geo import distance_km_array
from registry.db import reading
from registry.models import Visit
from registry.stations import StationInfo, coordinates

MAX_GAP_MS = 30 * 60_000   # visits further apart are two trips, not a transition
MIN_SUPPORT = 3            # transitions seen fewer times than this are too thin to rank by
HISTORY_DAYS = 30
HISTORY_ROWS = 2_000_000   # newest visits read to learn from: bounded memory and time
HISTORY_CHUNK = 50_000     # rows fetched and converted at a time (learn_from_history)
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
    def learn(cls, tag: np.ndarray, station: np.ndarray, first_ms: np.ndarray,
              last_ms: np.ndarray, names: tuple[str, ...],
              directory: Mapping[str, StationInfo]) -> Forecast:
        """From visits as arrays (station: index into `names`), in any order."""
        n = len(names)
        order = np.lexsort((first_ms, tag))
        t, s, f, last = tag[order], station[order].astype(np.int64), first_ms[order], \
            last_ms[order]
        step = (t[1:] == t[:-1]) & (s[1:] != s[:-1]) & (f[1:] - last[:-1] <= MAX_GAP_MS)
        a, b = s[:-1][step], s[1:][step]
        first = _ranked(a, b)
        both = step[:-1] & step[1:]  # two transitions in a row: (previous, station) -> next
        p, c, nx = s[:-2][both], s[1:-1][both], s[2:][both]
        second_flat = _ranked(p * n + c, nx)
        second = {(k // n, k % n): v for k, v in second_flat.items()}
        lat, lon = coordinates(names, directory)
        return cls(names, {name: i for i, name in enumerate(names)}, first, second, lat, lon)

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


def _ranked(src: np.ndarray, dst: np.ndarray) -> dict[int, list[int]]:
    """For each source, its destinations seen `MIN_SUPPORT` times or more, most first."""
    if not len(src):
        return {}
    n_dst = int(dst.max()) + 1
    pairs, counts = np.unique(src * n_dst + dst, return_counts=True)
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


async def learn_from_history(engine: AsyncEngine, directory: Mapping[str, StationInfo],
                             now_ms: int, chunk: int = HISTORY_CHUNK) -> Forecast:
    """The model from the newest stored visits of every bike.

    The rows come `chunk` at a time and each chunk becomes arrays before the next is
    fetched, so the event loop, the hot path on it, gets its turns in between: at full
    load the window holds all HISTORY_ROWS, and two million rows turned into lists, then
    arrays, in one go held the loop for seconds, every REFRESH_S."""
    index = {name: i for i, name in enumerate(directory)}
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    async with reading(engine).connect() as conn:
        result = await conn.stream(
            select(Visit.tag, Visit.station, Visit.first_ms, Visit.last_ms)
            .where(Visit.first_ms >= now_ms - HISTORY_DAYS * 86_400_000)
            .order_by(Visit.first_ms.desc()).limit(HISTORY_ROWS))
        async for rows in result.partitions(chunk):
            tag, station, first, last = zip(*rows, strict=True)
            parts.append((np.array(tag, np.int64),
                          np.array([index.setdefault(s, len(index)) for s in station], np.int64),
                          np.array(first, np.int64), np.array(last, np.int64)))
    columns = [np.concatenate(c) for c in zip(*parts, strict=True)] if parts else [
        np.empty(0, np.int64)] * 4
    # Station indices in sorted order of the names, as np.unique gave them; np.unique
    # itself, on two million ids, held the interpreter's lock for 6.7 to 8.3 s, even in
    # a thread: a sort of Python objects is one C call that never lets go of it.
    names = sorted(index)
    rank = np.empty(len(index), np.int64)
    rank[[index[n] for n in names]] = np.arange(len(names))
    # In a thread: numpy sorts two million rows without the interpreter's lock, and the
    # event loop goes on meanwhile.
    return await asyncio.to_thread(Forecast.learn, columns[0], rank[columns[1]], columns[2],
                                   columns[3], tuple(names), directory)
