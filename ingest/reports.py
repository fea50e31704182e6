"""Reports for people and programs, each as a terminal table, CSV and JSON: station
uptime (`bikewatch report uptime`, `GET /api/v1/reports/uptime`) and registration
coverage (`bikewatch report registration`, `GET /api/v1/reports/registration`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.clock import iso, parse_iso
from ingest.config import Settings
from registry.availability import StationUptime, UptimeReport, uptime_report
from registry.coverage import Coverage, coverage_report
from registry.errors import NotFound

FORMATS = ("table", "csv", "json")
DEFAULT_WINDOW_MS = 30 * 86_400_000
CSV_COLUMNS = ("scope", "id", "zone", "stations", "availability", "target", "gap",
               "downtime_s", "outages", "longest_outage_s", "transitions", "flapping")


async def uptime_for(engine: AsyncEngine, settings: Settings, from_text: str | None,
                     to_text: str | None, zone: str | None, now_ms: int) -> UptimeReport:
    """The report for ISO times as people give them; ValueError for a bad window, NotFound
    for a zone without stations."""
    to_ms = parse_iso(to_text, settings.tz) if to_text else now_ms
    from_ms = parse_iso(from_text, settings.tz) if from_text else to_ms - DEFAULT_WINDOW_MS
    if to_ms <= from_ms:
        raise ValueError(f"--from {_iso(from_ms)} is not before --to {_iso(to_ms)}")
    report = await uptime_report(engine, from_ms, to_ms, settings.uptime_stages(), zone=zone,
                                 flap_limit=settings.flap_transitions,
                                 flap_window_ms=int(settings.flap_window_s * 1000))
    if zone is not None and not report.stations:
        raise NotFound(f"no station of zone {zone!r} was provisioned in the window")
    return report


def _iso(ms: int) -> str:
    return iso(ms, "seconds")


def _station(s: StationUptime) -> dict[str, Any]:
    return {"station": s.station, "zone": s.zone, "availability": round(s.availability, 6),
            "downtime_s": round(s.downtime_s, 3), "outages": s.outages,
            "longest_outage_s": round(s.longest_outage_s, 3), "transitions": s.transitions,
            "flapping": s.flapping}


def as_json(r: UptimeReport) -> dict[str, Any]:
    return {
        "from_ms": r.from_ms, "to_ms": r.to_ms, "from": _iso(r.from_ms), "to": _iso(r.to_ms),
        "zone": r.zone,
        "target": {"stage": r.target.stage, "ratio": r.target.ratio,
                   "from_ms": r.target.from_ms},
        "fleet": {"stations": r.stations, "availability": round(r.availability, 6),
                  "gap": round(r.gap, 6), "meets_target": r.gap >= 0},
        "zones": [{"zone": z.zone, "stations": z.stations,
                   "availability": round(z.availability, 6),
                   "gap": round(z.availability - r.target.ratio, 6)} for z in r.zones],
        "below_target": [_station(s) for s in r.below_target],
        "flapping": [_station(s) for s in r.flapping],
        "series": {"bucket_ms": r.bucket_ms,
                   "points": [{"from_ms": t, "ratio": None if v is None else round(v, 6)}
                              for t, v in r.series]},
    }


def as_csv(r: UptimeReport) -> str:
    """One rectangular table: the fleet, each zone, then every station."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    target = r.target.ratio
    w.writerow(("fleet", "", r.zone or "", r.stations, f"{r.availability:.6f}", target,
                f"{r.gap:.6f}", "", "", "", "", ""))
    for z in r.zones:
        w.writerow(("zone", z.zone, z.zone, z.stations, f"{z.availability:.6f}", target,
                    f"{z.availability - target:.6f}", "", "", "", "", ""))
    for s in sorted(r.per_station, key=lambda s: (s.availability, s.station)):
        w.writerow(("station", s.station, s.zone, 1, f"{s.availability:.6f}", target,
                    f"{s.availability - target:.6f}", f"{s.downtime_s:.3f}", s.outages,
                    f"{s.longest_outage_s:.3f}", s.transitions, int(s.flapping)))
    return out.getvalue()


def _duration(seconds: float) -> str:
    s = round(seconds)
    d, s = divmod(s, 86_400)
    h, s = divmod(s, 3_600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def as_table(r: UptimeReport, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    verdict = "meets" if r.gap >= 0 else "BELOW"
    console.print(f"Station uptime {_iso(r.from_ms)} to {_iso(r.to_ms)}"
                  + (f", zone {r.zone}" if r.zone else ""))
    console.print(f"Target: stage {r.target.stage}, {r.target.ratio:.2%} "
                  f"(in force since {_iso(r.target.from_ms)})")
    console.print(f"Fleet: {r.availability:.3%} over {r.stations} stations, "
                  f"gap {r.gap * 100:+.3f} points: {verdict} target")
    zones = Table("zone", "stations", "availability", "gap", title="By zone")
    for z in r.zones:
        zones.add_row(z.zone, str(z.stations), f"{z.availability:.3%}",
                      f"{(z.availability - r.target.ratio) * 100:+.3f}")
    console.print(zones)
    below = Table("station", "zone", "availability", "downtime", "outages", "longest",
                  title="Stations below target, worst first")
    for s in r.below_target:
        below.add_row(s.station, s.zone, f"{s.availability:.3%}", _duration(s.downtime_s),
                      str(s.outages), _duration(s.longest_outage_s))
    console.print(below if r.below_target else "No station below target.")
    if r.flapping:
        flap = Table("station", "zone", "changes", "availability", title="Flapping")
        for s in r.flapping:
            flap.add_row(s.station, s.zone, str(s.transitions), f"{s.availability:.3%}")
        console.print(flap)
    else:
        console.print("No flapping station.")
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


COVERAGE_COLUMNS = ("community", "registered", "heard", "heard_ratio", "unknown_tags")


async def coverage_for(engine: AsyncEngine, days: float, now_ms: int) -> Coverage:
    if not 0 < days <= 3_650:
        raise ValueError(f"--days {days} is not in (0, 3650]")
    return await coverage_report(engine, now_ms - int(days * 86_400_000), now_ms)


def coverage_json(c: Coverage) -> dict[str, Any]:
    def ratio(v: float | None) -> float | None:
        return None if v is None else round(v, 6)

    return {"from_ms": c.from_ms, "to_ms": c.to_ms, "from": _iso(c.from_ms),
            "to": _iso(c.to_ms),
            "town": {"registered": c.registered, "heard": c.heard,
                     "heard_ratio": ratio(c.heard / c.registered if c.registered else None),
                     "unknown_tags": c.unknown_tags},
            "communities": [{"community": r.community, "registered": r.registered,
                             "heard": r.heard, "heard_ratio": ratio(r.heard_ratio),
                             "unknown_tags": r.unknown_tags} for r in c.communities]}


def coverage_csv(c: Coverage) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COVERAGE_COLUMNS)
    for r in c.communities:
        w.writerow((r.community, r.registered, r.heard,
                    "" if r.heard_ratio is None else f"{r.heard_ratio:.6f}", r.unknown_tags))
    return out.getvalue()


def coverage_table(c: Coverage, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    share = f"{c.heard / c.registered:.1%}" if c.registered else "-"
    console.print(f"Registration coverage {_iso(c.from_ms)} to {_iso(c.to_ms)}")
    console.print(f"Town: {c.registered} registered, {c.heard} heard ({share}), "
                  f"{c.unknown_tags} unknown tags heard")
    table = Table("community", "registered", "heard", "heard %", "unknown tags")
    for r in c.communities:
        table.add_row(r.community, str(r.registered), str(r.heard),
                      "-" if r.heard_ratio is None else f"{r.heard_ratio:.1%}",
                      str(r.unknown_tags))
    console.print(table)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


VIEWS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[..., str], Callable[..., str]]] = {
    "uptime": (as_json, as_csv, as_table),
    "registration": (coverage_json, coverage_csv, coverage_table),
}


def render(kind: str, report: Any, fmt: str, width: int = 100) -> dict[str, Any] | str:
    """A report in one of FORMATS: a JSON document, CSV text or a text table."""
    as_doc, as_text, as_tab = VIEWS[kind]
    if fmt == "json":
        return as_doc(report)
    return as_text(report) if fmt == "csv" else as_tab(report, width)
