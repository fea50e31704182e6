"""The ground truth of a simulated run: what really happened, to score bikewatch against.

Written by `bikewatch simulate --truth FILE` as JSON and read by `bikewatch
score --truth FILE`. Simulated times are `*_ms`; `wall_*_ms` are when the
simulator did it on the real clock, which bikewatch's own records (alert
`raised_ms`, station transitions) are on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson


@dataclass(slots=True)
class Pass:
    """A stolen bike passing within range of a station."""
    trip: int
    station: str
    at_ms: int            # when it was nearest the station
    reads: int            # reads the station heard (0: missed, off, or the tag is cut)
    tamper: bool          # the reads carry the tamper flag
    state: str = "up"     # the station then: up, power, flap (off) or uplink (sends late)
    skew: str | None = None  # the station's clock is wrong (simulator.day.SKEW_KINDS)
    wall_ms: int | None = None  # when its first read was published

    def expected(self, reported_ms: int, recovered_ms: int | None) -> bool:
        """bikewatch must alert this pass: heard at an up station with a right clock,
        after the report and before any recovery."""
        return (self.reads > 0 and self.state == "up" and self.skew is None
                and self.at_ms >= reported_ms
                and (recovered_ms is None or self.at_ms < recovered_ms))


@dataclass(slots=True)
class Theft:
    case_id: str
    tag: int
    bike: int
    stolen_ms: int
    place: int               # the crossing nearest where it was parked
    fence: str
    night: bool
    reported_ms: int
    recovered_ms: int | None
    cut_ms: int | None       # the tag cut off (it sends the tamper flag once, then nothing)
    trips: list[int]
    passes: list[Pass] = field(default_factory=list)
    wall_reported_ms: int | None = None
    wall_recovered_ms: int | None = None


@dataclass(slots=True)
class Outage:
    station: str
    kind: str                # power, flap (both off) or uplink (the station buffers)
    start_ms: int
    end_ms: int
    wall_start_ms: int | None = None
    wall_end_ms: int | None = None


@dataclass(slots=True)
class Truth:
    start_ms: int
    end_ms: int
    day_start_ms: int
    stations: int
    bikes: int
    seed: int
    thefts: list[Theft]
    outages: list[Outage]
    skews: dict[str, str]
    speedup: float = 1.0
    wall_start_ms: int = 0
    wall_end_ms: int = 0
    sent_batches: int = 0
    sent_reads: int = 0
    late_batches: int = 0           # sent after an uplink came back
    bad: dict[str, int] = field(default_factory=dict)  # malformed kind: count sent

    def write(self, path: str | Path) -> None:
        Path(path).write_bytes(orjson.dumps(dataclasses.asdict(self),
                                            option=orjson.OPT_INDENT_2))

    @classmethod
    def read(cls, path: str | Path) -> Truth:
        doc: dict[str, Any] = orjson.loads(Path(path).read_bytes())
        thefts = [Theft(**(t | {"passes": [Pass(**p) for p in t["passes"]]}))
                  for t in doc.pop("thefts")]
        outages = [Outage(**o) for o in doc.pop("outages")]
        return cls(thefts=thefts, outages=outages, **doc)
