"""`bikewatch score --truth FILE`: what bikewatch reported against what really happened.

From the database bikewatch wrote (alerts, station transitions, rejects) and
the ground truth of a simulated run:

- thefts alerted: of the thefts whose bike passed an up station with a right
  clock after the owner's report (and before any recovery), those with an
  alert for that pass; and every such pass, the same way;
- time to alert: from publishing the first post-report pass's first read to
  the alert being raised, on the real clock;
- false alerts: an alert for a tag that was not stolen, at a station the
  stolen bike never passed, or (tamper) without a cut tag there;
- outage minutes: station downtime that bikewatch recorded over the run
  against the true outages, both in simulated minutes;
- rejections: malformed payloads sent against those bikewatch kept, by reason.

The target is every expected theft alerted and no false alert; the command
exits 1 when it is missed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.availability import uptime_report
from registry.models import Alert, RejectRecord
from registry.tags import format_tag, from_db
from simulator.malformed import KINDS
from simulator.truth import Truth

VISIT_SLACK_MS = 90_000  # an alert's visit may open up to this far from the pass's centre


@dataclass(slots=True)
class Score:
    thefts: int
    expected_thefts: int          # passed an up station after the report
    alerted_thefts: int
    expected_passes: int
    alerted_passes: int
    late_passes: int              # heard during an uplink cut, sent late
    late_alerted: int
    tamper_expected: int
    tamper_alerted: int
    alerts: int
    false_alerts: int
    false_detail: list[str] = field(default_factory=list)
    time_to_alert_ms: list[int] = field(default_factory=list)
    outage_true_min: float = 0.0      # as the simulator cut and restored, simulated minutes
    outage_planned_min: float = 0.0
    outage_measured_min: float = 0.0  # bikewatch's station transitions
    bad_sent: dict[str, int] = field(default_factory=dict)     # reason: payloads/reads
    bad_counted: dict[str, int] = field(default_factory=dict)

    @property
    def alerted_share(self) -> float:
        return self.alerted_thefts / self.expected_thefts if self.expected_thefts else 1.0

    @property
    def outage_error(self) -> float:
        if not self.outage_true_min:
            return 0.0 if not self.outage_measured_min else float("inf")
        return abs(self.outage_measured_min - self.outage_true_min) / self.outage_true_min

    @property
    def met(self) -> bool:
        return self.alerted_thefts == self.expected_thefts and self.false_alerts == 0

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out |= {"alerted_share": self.alerted_share, "outage_error": self.outage_error,
                "target_met": self.met}
        return out

    def lines(self) -> list[str]:
        t = np.array(self.time_to_alert_ms or [0])
        return [
            f"thefts staged {self.thefts}; passed an up station after the report "
            f"{self.expected_thefts}; alerted {self.alerted_thefts} ({self.alerted_share:.0%})",
            f"post-report passes alerted {self.alerted_passes} of {self.expected_passes}; "
            f"passes sent late by a cut uplink alerted {self.late_alerted} of "
            f"{self.late_passes}; tamper alerts {self.tamper_alerted} of {self.tamper_expected}",
            "time from the first post-report pass to its alert: "
            + (f"median {np.median(t):.0f} ms, max {t.max():.0f} ms (real clock)"
               if self.time_to_alert_ms else "none measured"),
            f"alerts {self.alerts}, false {self.false_alerts}"
            + "".join(f"\n  false: {d}" for d in self.false_detail[:10]),
            f"outage minutes: bikewatch {self.outage_measured_min:.1f}, true "
            f"{self.outage_true_min:.1f} (planned {self.outage_planned_min:.1f}), error "
            f"{self.outage_error:.2%}",
            "rejected (sent / counted): " + (", ".join(
                f"{r} {self.bad_sent[r]}/{self.bad_counted.get(r, 0)}"
                for r in sorted(self.bad_sent)) or "none sent"),
            "target met: every expected theft alerted, no false alert" if self.met
            else "TARGET MISSED",
        ]


def _alerted(alerts: list[tuple[str, int, int]], station: str, at_ms: int,
             ) -> tuple[str, int, int] | None:
    """The alert (station, visit start, raised) for a pass of `station` at `at_ms`."""
    return next((a for a in alerts if a[0] == station
                 and abs(a[1] - at_ms) <= VISIT_SLACK_MS), None)


async def score(engine: AsyncEngine, truth: Truth) -> Score:
    async with engine.connect() as conn:
        rows = (await conn.execute(
            select(Alert.kind, Alert.case_id, Alert.tag, Alert.station, Alert.visit_first_ms,
                   Alert.raised_ms).where(Alert.raised_ms >= truth.wall_start_ms))).all()
        rejected = (await conn.execute(
            select(RejectRecord.reason, RejectRecord.reads, func.count())
            .where(RejectRecord.received_ms >= truth.wall_start_ms)
            .group_by(RejectRecord.reason, RejectRecord.reads))).all()
    by_case: dict[str, list[tuple[str, int, int]]] = {}
    tamper: set[tuple[int, str]] = set()
    for kind, case_id, _tag, station, first_ms, raised_ms in rows:
        if kind == "stolen_sighting":
            by_case.setdefault(case_id, []).append((station, first_ms, raised_ms))
        elif kind == "tamper":
            tamper.add((from_db(_tag), station))

    expected_thefts = alerted_thefts = expected_passes = alerted_passes = 0
    late = late_alerted = tamper_expected = tamper_alerted = 0
    delays: list[int] = []
    for th in truth.thefts:
        alerts = by_case.get(th.case_id, [])
        want = [p for p in th.passes if p.expected(th.reported_ms, th.recovered_ms)]
        if th.wall_reported_ms is None:
            want = []  # never reported within the run: nothing to alert
        if want:
            expected_thefts += 1
            first = _alerted(alerts, want[0].station, want[0].at_ms)
            alerted_thefts += first is not None
            if first is not None and want[0].wall_ms is not None:
                delays.append(first[2] - want[0].wall_ms)
        expected_passes += len(want)
        alerted_passes += sum(_alerted(alerts, p.station, p.at_ms) is not None for p in want)
        for p in th.passes:
            if (p.state == "uplink" and p.reads and p.skew is None
                    and th.wall_reported_ms is not None
                    and (th.recovered_ms is None or p.at_ms < th.recovered_ms)
                    and p.at_ms >= th.stolen_ms):
                late += 1
                late_alerted += _alerted(alerts, p.station, p.at_ms) is not None
            if p.tamper and p.reads and p.state in ("up", "uplink"):
                tamper_expected += 1
                tamper_alerted += (th.tag, p.station) in tamper

    stolen = {th.tag: th for th in truth.thefts}
    false: list[str] = []
    for kind, case_id, tag_db, station, _first, _raised in rows:
        tag = from_db(tag_db)
        theft = stolen.get(tag)
        where = f"{kind} tag {format_tag(tag)} at {station}"
        if theft is None:
            false.append(f"{where}: the bike was not stolen")
        elif kind == "stolen_sighting" and (case_id != theft.case_id or not any(
                p.station == station and p.reads for p in theft.passes)):
            false.append(f"{where}: the stolen bike never passed there")
        elif kind == "tamper" and not any(p.station == station and p.tamper
                                          for p in theft.passes):
            false.append(f"{where}: its tag was not cut there")
        elif kind not in ("stolen_sighting", "tamper"):
            false.append(f"{where}: no such thing was staged")

    true_ms = sum((o.wall_end_ms or truth.wall_end_ms) - o.wall_start_ms
                  for o in truth.outages if o.wall_start_ms is not None)
    measured_s = 0.0
    if truth.wall_end_ms > truth.wall_start_ms:
        report = await uptime_report(engine, truth.wall_start_ms, truth.wall_end_ms)
        measured_s = sum(s.downtime_s for s in report.per_station)
    to_min = truth.speedup / 60_000

    reason_of = {kind: f"{reason} ({unit})" for kind, reason, unit in KINDS}
    sent: dict[str, int] = {}
    for kind, n in truth.bad.items():
        sent[reason_of[kind]] = sent.get(reason_of[kind], 0) + n
    kept: dict[str, int] = {}
    for reason, reads, n in rejected:
        key = f"{reason} ({'payload' if reads == 0 else 'read'})"
        kept[key] = kept.get(key, 0) + int(n)

    return Score(
        thefts=len(truth.thefts), expected_thefts=expected_thefts,
        alerted_thefts=alerted_thefts, expected_passes=expected_passes,
        alerted_passes=alerted_passes, late_passes=late, late_alerted=late_alerted,
        tamper_expected=tamper_expected, tamper_alerted=tamper_alerted, alerts=len(rows),
        false_alerts=len(false), false_detail=false, time_to_alert_ms=delays,
        outage_true_min=true_ms * to_min,
        outage_planned_min=sum(o.end_ms - o.start_ms for o in truth.outages) / 60_000,
        outage_measured_min=measured_s * 1000 * to_min, bad_sent=sent, bad_counted=kept)
