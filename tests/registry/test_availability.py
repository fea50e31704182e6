"""Availability over windows, against figures computed by hand on a small staged history."""

from __future__ import annotations

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.availability import DAY_MS, HOUR_MS, uptime_report
from registry.imports import import_stations
from registry.models import StationTransition
from registry.targets import YEAR_MS, Targets

T0 = 1_763_769_600_000  # 2025-11-22T00:00Z
H = HOUR_MS

# A: up from before the window, down 2h-3h.       z1
# B: provisioned at 5h, up at 6h.                 z1
# C: up from before the window, offline from 1h.  z2
HISTORY = [
    ("A", -H, False, "never"), ("A", -H // 2, True, "online"), ("A", 2 * H, False, "silent"),
    ("A", 3 * H, True, "online"),
    ("B", 5 * H, False, "never"), ("B", 6 * H, True, "online"),
    ("C", -2 * H, False, "never"), ("C", -H, True, "online"), ("C", H, False, "offline"),
]


async def _stage(engine: AsyncEngine, history: list[tuple[str, int, bool, str]],
                 stations: str = "A,a,,,z1\nB,b,,,z1\nC,c,,,z2\n") -> None:
    await import_stations(engine, "id,name,lat,lon,zone\n" + stations, T0 - 3 * H)
    if not history:
        return
    async with engine.begin() as conn:
        await conn.execute(insert(StationTransition), [
            {"station": s, "at_ms": T0 + t, "up": up, "cause": cause}
            for s, t, up, cause in history])


class TestWindows:
    async def test_fleet_zone_and_station_figures(self, engine: AsyncEngine) -> None:
        await _stage(engine, HISTORY)
        r = await uptime_report(engine, T0, T0 + 10 * H)
        # time-weighted ratio: 1 (1h), 1/2 (1h), 0 (1h), 1/2 (2h), 1/3 (1h), 2/3 (4h)
        assert r.availability == pytest.approx(5.5 / 10)
        assert r.stations == 3
        by_zone = {z.zone: (z.stations, z.availability) for z in r.zones}
        assert by_zone["z1"] == (2, pytest.approx(8.5 / 10))
        assert by_zone["z2"] == (1, pytest.approx(0.1))
        st = {s.station: s for s in r.per_station}
        assert (st["A"].availability, st["A"].downtime_s, st["A"].outages,
                st["A"].longest_outage_s) == (pytest.approx(0.9), 3600, 1, 3600)
        assert (st["B"].availability, st["B"].downtime_s) == (pytest.approx(0.8), 3600)
        assert (st["C"].availability, st["C"].outages, st["C"].longest_outage_s) == (
            pytest.approx(0.1), 1, 9 * 3600)
        assert [s.station for s in r.below_target] == ["C", "B", "A"]  # worst first

    async def test_a_window_that_cuts_through_outages(self, engine: AsyncEngine) -> None:
        await _stage(engine, HISTORY)
        r = await uptime_report(engine, T0 + 2 * H + H // 2, T0 + 4 * H)
        st = {s.station: s for s in r.per_station}
        assert (st["A"].availability, st["A"].outages, st["A"].longest_outage_s) == (
            pytest.approx(2 / 3), 1, 1800)
        assert st["C"].availability == 0 and st["C"].longest_outage_s == 1.5 * 3600
        assert "B" not in st  # provisioned after the window
        assert r.availability == pytest.approx((0 * 0.5 + 0.5 * 1) / 1.5)

    async def test_series_is_the_mean_ratio_per_bucket(self, engine: AsyncEngine) -> None:
        await _stage(engine, HISTORY)
        r = await uptime_report(engine, T0, T0 + 10 * H)
        assert r.bucket_ms == H
        assert [round(v or 0, 6) for _, v in r.series] == [
            1, 0.5, 0, 0.5, 0.5, round(1 / 3, 6), *[round(2 / 3, 6)] * 4]
        month = await uptime_report(engine, T0 - 10 * DAY_MS, T0 + 20 * DAY_MS)
        assert month.bucket_ms == DAY_MS and len(month.series) == 30

    async def test_zone_filter(self, engine: AsyncEngine) -> None:
        await _stage(engine, HISTORY)
        r = await uptime_report(engine, T0, T0 + 10 * H, zone="z2")
        assert [s.station for s in r.per_station] == ["C"]
        assert r.availability == pytest.approx(0.1)

    async def test_flapping_within_the_window(self, engine: AsyncEngine) -> None:
        flaps = [("D", 10 * 60_000 * i, i % 2 == 1, "online" if i % 2 else "offline")
                 for i in range(8)]  # 8 changes in 70 minutes, 7 of them within an hour
        await _stage(engine, flaps, "D,d,,,z1\n")
        r = await uptime_report(engine, T0, T0 + 2 * H, flap_limit=6, flap_window_ms=H)
        assert [(s.station, s.transitions) for s in r.flapping] == [("D", 8)]
        calm = await uptime_report(engine, T0, T0 + 2 * H, flap_limit=7, flap_window_ms=H)
        assert calm.flapping == []

    async def test_a_station_imported_while_no_worker_ran_is_down(
            self, engine: AsyncEngine) -> None:
        await _stage(engine, [], "E,e,,,z1\n")
        r = await uptime_report(engine, T0, T0 + H)
        assert [(s.station, s.availability, s.outages) for s in r.per_station] == [("E", 0, 1)]


class TestTargets:
    def test_default_stages_from_the_first_provisioning(self) -> None:
        t = Targets.build([], T0)
        assert (t.at(T0).stage, t.at(T0).ratio) == (1, 0.95)
        assert (t.at(T0 + YEAR_MS).stage, t.at(T0 + YEAR_MS).ratio) == (2, 1.0)
        assert t.at(T0 - 1).stage == 1

    async def test_report_names_the_stage_in_force(self, engine: AsyncEngine) -> None:
        await _stage(engine, HISTORY)
        r = await uptime_report(engine, T0, T0 + 10 * H, [(T0 - DAY_MS, 0.9),
                                                           (T0 + 5 * H, 0.5)])
        assert (r.target.stage, r.target.ratio) == (2, 0.5)
        assert r.gap == pytest.approx(0.05)
        assert [s.station for s in r.below_target] == ["C"]
