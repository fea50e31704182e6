"""Availability over any window, from the stored station transitions.

The towns judge the network by the online ratio (up stations over provisioned
stations). Over a window, the fleet's (or a zone's) availability is the
time-weighted mean of that instantaneous ratio; a station's is the share of
the window it was up, counted from its provisioning. Outages are the down
stretches inside the window (one that began before it counts from the
window's start); a zero-length one (down and up at the same instant) is not
an outage. A station is flapping in the window when more than the limit of its
changes fall within one flap window.

Everything is computed over all stations at once: the transitions become one
sorted event table, and the sums are `bincount`s over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.models import Station, StationTransition
from registry.targets import Target, Targets

HOUR_MS, DAY_MS = 3_600_000, 86_400_000


@dataclass(slots=True, frozen=True)
class StationUptime:
    station: str
    zone: str
    availability: float
    downtime_s: float
    outages: int
    longest_outage_s: float
    transitions: int      # changes inside the window
    flapping: bool


@dataclass(slots=True, frozen=True)
class ZoneUptime:
    zone: str
    stations: int
    availability: float


@dataclass(slots=True)
class UptimeReport:
    from_ms: int
    to_ms: int
    zone: str | None
    target: Target
    stations: int
    availability: float
    zones: list[ZoneUptime] = field(default_factory=list)
    per_station: list[StationUptime] = field(default_factory=list)
    bucket_ms: int = HOUR_MS
    series: list[tuple[int, float | None]] = field(default_factory=list)  # bucket start, ratio

    @property
    def gap(self) -> float:
        return self.availability - self.target.ratio

    @property
    def below_target(self) -> list[StationUptime]:
        """The stations that pull the fleet below its target, worst first."""
        below = [s for s in self.per_station if s.availability < self.target.ratio]
        return sorted(below, key=lambda s: (-s.downtime_s, s.availability, s.station))

    @property
    def flapping(self) -> list[StationUptime]:
        return sorted((s for s in self.per_station if s.flapping),
                      key=lambda s: (-s.transitions, s.station))


@dataclass(slots=True, frozen=True)
class _Events:
    """One row per state interval start, sorted by (station, time)."""

    station: np.ndarray   # index into the station list
    t: np.ndarray         # ms, clipped to the window
    up: np.ndarray        # 1 up, 0 down
    real: np.ndarray      # a stored change inside the window (not the state at its start)
    dur: np.ndarray       # ms until the station's next row, or the window's end


def _events(rows: list[tuple[int, int, int, bool]], from_ms: int, to_ms: int) -> _Events:
    """rows: (station index, time, up, real), any order."""
    arr = np.array(rows, dtype=np.int64).reshape(-1, 4)
    if not len(arr):
        empty = np.zeros(0, dtype=np.int64)
        return _Events(empty, empty, empty, empty.astype(bool), empty)
    order = np.lexsort((arr[:, 1], arr[:, 0]))
    arr = arr[order]
    station, t = arr[:, 0], np.clip(arr[:, 1], from_ms, to_ms)
    nxt = np.append(t[1:], to_ms)
    last = np.append(station[1:] != station[:-1], True)
    nxt[last] = to_ms
    return _Events(station, t, arr[:, 2], arr[:, 3].astype(bool), nxt - t)


def _mean_ratio(ev: _Events, mask: np.ndarray, from_ms: int, to_ms: int,
                bucket_ms: int | None = None) -> tuple[float, list[tuple[int, float | None]]]:
    """Time-weighted mean of up/observed over the window (and per bucket), for the
    events' stations selected by `mask` (per event)."""
    st, t, up = ev.station[mask], ev.t[mask], ev.up[mask]
    if not len(st):
        return 0.0, []
    first = np.append(True, st[1:] != st[:-1])
    prev_up = np.append(0, up[:-1])
    prev_up[first] = 0
    d_up, d_obs = up - prev_up, first.astype(np.int64)
    bounds = (np.arange(from_ms, to_ms, bucket_ms, dtype=np.int64) if bucket_ms
              else np.array([from_ms], dtype=np.int64))
    times = np.concatenate([t, bounds])
    d_up = np.concatenate([d_up, np.zeros(len(bounds), np.int64)])
    d_obs = np.concatenate([d_obs, np.zeros(len(bounds), np.int64)])
    order = np.argsort(times, kind="stable")
    times, cum_up, cum_obs = times[order], np.cumsum(d_up[order]), np.cumsum(d_obs[order])
    dt = np.append(times[1:], to_ms) - times
    seen = cum_obs > 0
    ratio = np.where(seen, cum_up / np.maximum(cum_obs, 1), 0.0)
    weight = np.where(seen, dt, 0).astype(np.float64)
    total = weight.sum()
    mean = float((ratio * weight).sum() / total) if total else 0.0
    series: list[tuple[int, float | None]] = []
    if bucket_ms:
        bucket = np.searchsorted(bounds, times, side="right") - 1
        w = np.bincount(bucket, weights=weight, minlength=len(bounds))
        s = np.bincount(bucket, weights=ratio * weight, minlength=len(bounds))
        series = [(int(b), float(s[i] / w[i]) if w[i] else None)
                  for i, b in enumerate(bounds.tolist())]
    return mean, series


def bucket_for(from_ms: int, to_ms: int) -> int:
    return HOUR_MS if to_ms - from_ms <= 2 * DAY_MS else DAY_MS


async def uptime_report(engine: AsyncEngine, from_ms: int, to_ms: int,
                        stages: Sequence[tuple[int, float]] = (), *, zone: str | None = None,
                        flap_limit: int = 6, flap_window_ms: int = HOUR_MS) -> UptimeReport:
    """The report over [from_ms, to_ms); `stages` as `Settings.uptime_stages()`."""
    if to_ms <= from_ms:
        raise ValueError("the window must end after it starts")
    q = select(Station.id, Station.zone, Station.imported_ms).where(Station.imported.is_(True))
    if zone is not None:
        q = q.where(Station.zone == zone)
    newest_before = (select(func.max(StationTransition.id))
                     .where(StationTransition.at_ms < from_ms)
                     .group_by(StationTransition.station))
    async with engine.connect() as conn:
        first = (await conn.execute(select(func.min(Station.imported_ms))
                                    .where(Station.imported.is_(True)))).scalar()
        stations = (await conn.execute(q.order_by(Station.id))).all()
        before = (await conn.execute(
            select(StationTransition.station, StationTransition.up)
            .where(StationTransition.id.in_(newest_before)))).all()
        inside = (await conn.execute(
            select(StationTransition.station, StationTransition.at_ms, StationTransition.up)
            .where(StationTransition.at_ms >= from_ms, StationTransition.at_ms < to_ms)
            .order_by(StationTransition.station, StationTransition.at_ms,
                      StationTransition.id))).all()
        tracked = set((await conn.execute(
            select(StationTransition.station).group_by(StationTransition.station))).scalars())
    index = {s.id: i for i, s in enumerate(stations)}
    rows: list[tuple[int, int, int, bool]] = []
    for station, up in before:
        if station in index:
            rows.append((index[station], from_ms, int(up), False))
    for station, at_ms, up in inside:
        if station in index:
            rows.append((index[station], at_ms, int(up), True))
    for i, s in enumerate(stations):
        # Imported while no worker ran: down from its provisioning, as a worker records it.
        if s.id not in tracked and s.imported_ms is not None and s.imported_ms < to_ms:
            rows.append((i, s.imported_ms, 0, s.imported_ms >= from_ms))
    n = len(stations)
    ev = _events(rows, from_ms, to_ms)
    bucket_ms = bucket_for(from_ms, to_ms)
    fleet, series = _mean_ratio(ev, np.ones(len(ev.t), bool), from_ms, to_ms, bucket_ms)
    target = Targets.build(stages, first).at(to_ms)
    report = UptimeReport(from_ms, to_ms, zone, target, len(set(ev.station.tolist())), fleet,
                          bucket_ms=bucket_ms, series=series)

    up_ms = np.bincount(ev.station, weights=ev.dur * ev.up, minlength=n)
    obs_ms = np.bincount(ev.station, weights=ev.dur, minlength=n)
    down = ev.up == 0
    first_row = np.append(True, ev.station[1:] != ev.station[:-1])
    new_run = down & (first_row | np.append(True, ev.up[:-1] == 1))
    run = np.cumsum(new_run) - 1
    run_ms = np.bincount(run[down], weights=ev.dur[down], minlength=int(new_run.sum()))
    run_station = ev.station[new_run]
    real_outage = run_ms > 0
    outages = np.bincount(run_station[real_outage], minlength=n)
    longest = np.zeros(n)
    np.maximum.at(longest, run_station[real_outage], run_ms[real_outage])
    changes = np.bincount(ev.station[ev.real], minlength=n)
    most = _most_within(ev.station[ev.real], ev.t[ev.real] - from_ms, flap_window_ms,
                        to_ms - from_ms, n)
    observed = obs_ms > 0
    zones = [s.zone for s in stations]
    for i in np.flatnonzero(observed).tolist():
        report.per_station.append(StationUptime(
            stations[i].id, zones[i], float(up_ms[i] / obs_ms[i]),
            float((obs_ms[i] - up_ms[i]) / 1000), int(outages[i]), float(longest[i] / 1000),
            int(changes[i]), bool(most[i] > flap_limit)))
    zone_of_event = np.array(zones, dtype=object)[ev.station] if len(ev.t) else np.array([])
    for z in sorted(set(zones)):
        mask = zone_of_event == z
        count = len(set(ev.station[mask].tolist()))
        if count:
            report.zones.append(ZoneUptime(z, count, _mean_ratio(ev, mask, from_ms, to_ms)[0]))
    return report


def _most_within(station: np.ndarray, t: np.ndarray, window_ms: int, span_ms: int,
                 n: int) -> np.ndarray:
    """Per station, the most changes that fall within any `window_ms` (sorted input)."""
    out = np.zeros(n, dtype=np.int64)
    if not len(t):
        return out
    key = station * (span_ms + window_ms + 1) + t  # stations never share a window
    counts = np.searchsorted(key, key + window_ms, side="right") - np.arange(len(key))
    np.maximum.at(out, station, counts)
    return out
