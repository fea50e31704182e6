"""Playing a planned window of the town onto a broker, in scaled real time.

`Fleet` holds the stations' MQTT connections: one client per station, each
with its Last Will, so that a power cut is a dropped connection and the broker
says `offline` for the station; or one multiplexed client that says it itself.
`Runner` walks simulated time in steps, publishing every station's reads of
the step as one batch, heartbeats, the outages (a cut uplink buffers its reads
and sends them late when it comes back; a power cut loses them and reboots the
station), wrong clocks, malformed payloads at `bad_rate` per batch, and the
owners' reports and recoveries, filed in the registry as `bikewatch theft
report` would. It records on the truth the wall time of everything it did.

With `speedup` above 1 the simulated window is in the past (it ends about
when the run does), so that no read is ever ahead of the platform's clock.
The runner is synchronous and runs in a thread of its own: paho publishes
from any thread, and the registry calls go to the event loop that owns the
database engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.clock import wall_ms
from ingest.config import MqttEndpoint
from registry.cases import recover_theft, report_theft
from simulator import malformed
from simulator.day import DAY_MS, HOUR_MS, Plan
from simulator.publisher import StationPublisher
from simulator.truth import Outage, Pass, Theft, Truth

HEARTBEAT_MS = 30_000   # simulated; at most one every HEARTBEAT_WALL_S of real time
HEARTBEAT_WALL_S = 2.0
STEP_WALL_S = 0.05      # one batch per station per step: at most 20 a second
SETTLE_S = 1.0          # after connecting, before the clock starts
BACKLOG_BATCH = 500     # reads per batch when a station sends its buffer


class Fleet:
    def __init__(self, endpoint: MqttEndpoint, root: str, stations: list[str], *,
                 per_station: bool = True, binary_share: float = 0.8,
                 client_prefix: str = "bikewatch-sim") -> None:
        self.endpoint, self.root, self.stations = endpoint, root, stations
        self.binary_share, self.prefix = binary_share, client_prefix
        self.links: dict[str, StationPublisher] = {}  # connected, one per station
        self.down: dict[str, StationPublisher] = {}   # cut off: kept for their boot and seq
        self.shared = None if per_station else self._client(client_prefix, None)
        self._retired = [0, 0]  # batches, reads of the clients cut off

    def _client(self, client_id: str, station: str | None) -> StationPublisher:
        return StationPublisher(self.endpoint, self.root, client_id=client_id,
                                binary_share=self.binary_share, will=station)

    def _live(self) -> list[StationPublisher]:
        return [self.shared] if self.shared is not None else list(self.links.values())

    def connect(self) -> None:
        if self.shared is not None:
            self.shared.connect()
        for sid in self.stations:
            self._up(sid)

    def _up(self, sid: str, before: StationPublisher | None = None) -> None:
        if self.shared is None:
            link = self._client(f"{self.prefix}-{sid}", sid)
            if before is not None:
                link.boots, link.seq = dict(before.boots), dict(before.seq)
            link.connect()
            self.links[sid] = link
        self.pub(sid).status(sid, "online")

    def pub(self, sid: str) -> StationPublisher:
        return self.shared if self.shared is not None else self.links[sid]

    def cut(self, sid: str) -> int:
        """The station's link drops without a goodbye; when it did (wall ms)."""
        if self.shared is not None:
            self.shared.status(sid, "offline")  # what the broker says for a Last Will
            return wall_ms()
        link = self.links.pop(sid)
        link.flush(10.0)  # what it sent before the cut did arrive
        at = wall_ms()
        link.cut()
        self._retired[0] += link.sent_batches
        self._retired[1] += link.sent_reads
        self.down[sid] = link
        return at

    def restore(self, sid: str, reboot: bool) -> None:
        self._up(sid, self.down.pop(sid, None))
        if reboot:
            self.pub(sid).reboot(sid)

    def sent(self) -> tuple[int, int]:
        live = self._live()
        return (self._retired[0] + sum(c.sent_batches for c in live),
                self._retired[1] + sum(c.sent_reads for c in live))

    def flush(self) -> None:
        for c in self._live():
            c.flush(30.0)

    def close(self) -> None:
        for c in self._live():
            c.close()


class Clerk:
    """Files the owners' reports and the recoveries in the registry, on the event loop
    that owns `engine` (the runner is in another thread)."""

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.loop = engine, loop

    def _call(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def report(self, theft: Theft) -> None:
        self._call(report_theft(self.engine, theft.tag, theft.case_id, theft.stolen_ms,
                                wall_ms(), "simulator", place=f"near {theft.place}"))

    def recover(self, theft: Theft) -> None:
        self._call(recover_theft(self.engine, theft.case_id, wall_ms(), "simulator",
                                 how="found at the buyer's"))


@dataclass(slots=True)
class Progress:
    """What the progress display shows; written by the runner, read by the display."""
    sim_ms: int = 0
    end_ms: int = 0
    reads: int = 0
    batches: int = 0
    bad: int = 0
    staged: int = 0
    reported: int = 0
    down: set[str] = field(default_factory=set)
    rate: float = 0.0     # reads sent per wall second, smoothed
    events: list[str] = field(default_factory=list)  # newest last

    def note(self, text: str) -> None:
        self.events = [*self.events[-7:], text]


class Rate:
    """Per second, over about the last second, of a growing counter: call with its value."""

    def __init__(self) -> None:
        self.t, self.n, self.rate = wall_ms(), 0.0, 0.0

    def __call__(self, n: float) -> float:
        now = wall_ms()
        if now - self.t >= 1000:
            self.rate = (n - self.n) * 1000 / (now - self.t)
            self.t, self.n = now, n
        return self.rate


def skew(kind: str | None, ts: np.ndarray, start_ms: int, end_ms: int) -> np.ndarray:
    """A station's wrong clock applied to true times."""
    match kind:
        case "year_ahead":
            return ts + 365 * DAY_MS
        case "day_behind":
            return ts - DAY_MS
        case "epoch0":  # a clock that starts at 0 when the station boots
            return ts - start_ms + 60_000
        case "jump":  # right, then two hours fast from half way
            return np.where(ts >= (start_ms + end_ms) // 2, ts + 2 * HOUR_MS, ts)
    return ts


class Runner:
    def __init__(self, plan: Plan, fleet: Fleet, clerk: Clerk | None, *, speedup: float,
                 bad_rate: float, stop: threading.Event,
                 progress: Progress | None = None) -> None:
        self.plan, self.fleet, self.clerk, self.speedup = plan, fleet, clerk, speedup
        self.bad_rate, self.stop = bad_rate, stop
        self.progress = progress or Progress()
        self.truth: Truth = plan.truth
        self.truth.speedup = speedup
        self.rng = np.random.default_rng([plan.town.seed, 99])
        self.cut: dict[str, str] = {}          # station: outage kind, while it lasts
        self.buffer: dict[str, list[tuple[np.ndarray, ...]]] = {}
        self._bad_debt = 0.0
        self._bad_n = 0
        self._watch: dict[tuple[int, str], list[Pass]] = {}
        for th in self.truth.thefts:
            for ps in th.passes:
                self._watch.setdefault((th.tag, ps.station), []).append(ps)
        self._stolen = np.array(sorted({th.tag for th in self.truth.thefts}), dtype=np.uint64)

    # -- the timeline ------------------------------------------------------------------

    def _events(self) -> list[tuple[int, int, Callable[[], None]]]:
        ev: list[tuple[int, int, Callable[[], None]]] = []
        for o in self.truth.outages:
            ev.append((o.start_ms, 0, partial(self._outage, o, True)))
            ev.append((o.end_ms, 1, partial(self._outage, o, False)))
        for th in self.truth.thefts:
            ev.append((th.stolen_ms, 2, partial(self._stolen_now, th)))
            ev.append((th.reported_ms, 3, partial(self._report, th)))
            if th.recovered_ms is not None:
                ev.append((th.recovered_ms, 4, partial(self._recover, th)))
        return sorted(ev, key=lambda e: (e[0], e[1]))

    def _outage(self, o: Outage, starts: bool) -> None:
        if starts:
            o.wall_start_ms = self.fleet.cut(o.station)
            self.cut[o.station] = o.kind
            self.progress.down.add(o.station)
            self.progress.note(f"{o.station}: {o.kind} outage")
            return
        self.fleet.restore(o.station, reboot=o.kind != "uplink")
        o.wall_end_ms = wall_ms()
        self.cut.pop(o.station, None)
        self.progress.down.discard(o.station)
        self.progress.note(f"{o.station}: back")
        for cols in self.buffer.pop(o.station, []):
            for i in range(0, len(cols[0]), BACKLOG_BATCH):
                self._publish(o.station, *(c[i:i + BACKLOG_BATCH] for c in cols))
                self.truth.late_batches += 1

    def _stolen_now(self, th: Theft) -> None:
        self.progress.staged += 1
        self.progress.note(f"theft staged: tag {th.tag:08x}")

    def _report(self, th: Theft) -> None:
        if self.clerk is not None:
            self.clerk.report(th)
            th.wall_reported_ms = wall_ms()
            self.progress.reported += 1
            self.progress.note(f"reported: case {th.case_id}")

    def _recover(self, th: Theft) -> None:
        if self.clerk is not None and th.wall_reported_ms is not None:
            self.clerk.recover(th)
            th.wall_recovered_ms = wall_ms()
            self.progress.note(f"recovered: case {th.case_id}")

    # -- publishing --------------------------------------------------------------------

    def _publish(self, sid: str, tag: np.ndarray, ts: np.ndarray, rssi: np.ndarray,
                 flags: np.ndarray) -> None:
        t = skew(self.truth.skews.get(sid), ts, self.plan.start_ms, self.plan.end_ms)
        self.fleet.pub(sid).reads(sid, tag, t, rssi, int(t.max()), flags)
        stolen = np.flatnonzero(np.isin(tag, self._stolen))
        if len(stolen):
            now = wall_ms()
            for i in stolen.tolist():
                for ps in self._watch.get((int(tag[i]), sid), []):
                    if ps.wall_ms is None and abs(ps.at_ms - int(ts[i])) <= 60_000:
                        ps.wall_ms = now

    def _bad(self, batches: int) -> None:
        self._bad_debt += self.bad_rate * batches
        up = [s for s in self.plan.town.station_ids if s not in self.cut]
        while self._bad_debt >= 1 and up:
            self._bad_debt -= 1
            kind, _, counted = malformed.KINDS[self._bad_n % len(malformed.KINDS)]
            sid = up[int(self.rng.integers(0, len(up)))]
            pub = self.fleet.pub(sid)
            if counted == "read":
                boot, seq = pub.next_seq(sid)
            else:
                boot, seq = 1, malformed.BAD_SEQ_BASE + self._bad_n
            pub.raw(f"{self.fleet.root}/stations/{sid}/reads",
                    malformed.make(kind, sid, boot, seq, self.progress.sim_ms))
            self._bad_n += 1
            self.truth.bad[kind] = self.truth.bad.get(kind, 0) + 1
            self.progress.bad += 1

    def _step(self, lo: int, hi: int) -> None:
        r = self.plan.reads
        a, b = np.searchsorted(r.ts_ms, [lo, hi])
        if b <= a:
            return
        st = r.station[a:b]
        order = np.argsort(st, kind="stable")
        st = st[order]
        cols = [c[a:b][order] for c in (r.tag, r.ts_ms, r.rssi, r.flags)]
        cuts = np.flatnonzero(np.diff(st)) + 1
        batches = 0
        for s, e in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(st)].tolist(), strict=True):
            sid = self.plan.town.station_ids[int(st[s])]
            part = tuple(c[s:e] for c in cols)
            if sid in self.cut:
                if self.cut[sid] == "uplink":  # heard, kept, sent when the link is back
                    self.buffer.setdefault(sid, []).append(part)
                continue
            self._publish(sid, *part)
            batches += 1
        self._bad(batches)

    def _heartbeats(self, sim_ms: int) -> None:
        for sid in self.plan.town.station_ids:
            if sid not in self.cut:
                t = int(skew(self.truth.skews.get(sid), np.array([sim_ms]), self.plan.start_ms,
                             self.plan.end_ms)[0])
                self.fleet.pub(sid).heartbeat(sid, t)

    def run(self) -> Truth:
        plan, speedup = self.plan, self.speedup
        step = max(1_000, int(speedup * STEP_WALL_S * 1000))
        beat = max(HEARTBEAT_MS, int(speedup * HEARTBEAT_WALL_S * 1000))
        events = self._events()
        self.stop.wait(SETTLE_S)  # the service takes every station's `online` first
        wall0 = wall_ms()
        self.truth.wall_start_ms = wall0
        self.progress.end_ms = plan.end_ms
        sim, next_beat, e = plan.start_ms, plan.start_ms, 0
        rate = Rate()
        while sim < plan.end_ms and not self.stop.is_set():
            hi = min(sim + step, plan.end_ms)
            while e < len(events) and events[e][0] < hi:
                events[e][2]()
                e += 1
            self._step(sim, hi)
            if sim >= next_beat:
                self._heartbeats(sim)
                next_beat += beat
            sim = hi
            p = self.progress
            p.sim_ms = sim
            p.batches, p.reads = self.fleet.sent()
            p.rate = rate(p.reads)
            now = wall_ms()
            delay = wall0 / 1000 + (sim - plan.start_ms) / speedup / 1000 - now / 1000
            if delay > 0:
                self.stop.wait(delay)
        self.fleet.flush()
        self.truth.wall_end_ms = wall_ms()
        self.truth.sent_batches, self.truth.sent_reads = self.fleet.sent()
        return self.truth
