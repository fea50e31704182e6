"""What happens in the town over a window of simulated time, planned up front.

Everything is decided before the first publish, from the seed: every trip of
every bike, the thefts (mostly at night near hotspots, ridden fast to a fence
area, sometimes with the tag cut off on the way, moved on again after the
owner's late report, some recovered), the station outages (power cuts, links
that drop and send their buffer late, stations that flap) and the stations
with wrong clocks. The result is every read each station hears, in time order,
and the ground truth (`simulator.truth`) to score bikewatch against.

A read is generated for each second a tag is within range of a station, with
probability `p_read`, and an RSSI that falls with distance; passes are turned
into reads all at once with `np.repeat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulator.town import Place, Town
from simulator.truth import Outage, Pass, Theft, Truth

MIN_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000
TAMPER = 0x2  # PROTOCOL.md 2.1 flags bit 1
SKEW_KINDS = ("year_ahead", "day_behind", "epoch0", "jump")


@dataclass(slots=True, frozen=True)
class Scenario:
    theft_rate: float = 1.0        # thefts per simulated hour, over the window
    outage_rate: float = 0.5       # outages per station per simulated day
    skewed: int = -1               # stations with wrong clocks; -1: one in twenty
    p_cut: float = 0.25            # a thief cuts the tag off on the way
    p_recover: float = 0.3
    night_share: float = 0.7       # thefts between 22:00 and 05:00
    quick_reports: bool = False    # the demo's: a theft right away, reported within seconds


@dataclass(slots=True)
class Reads:
    """Columns, sorted by ts_ms."""
    station: np.ndarray   # int64 index into town.station_ids
    tag: np.ndarray       # uint64
    ts_ms: np.ndarray     # int64, the true time
    rssi: np.ndarray      # int8
    flags: np.ndarray     # uint16


@dataclass(slots=True)
class Plan:
    town: Town
    start_ms: int
    end_ms: int
    reads: Reads
    truth: Truth


@dataclass(slots=True)
class _Trips:
    """Trips being planned: per trip, who, when, how fast, and the crossings."""
    bike: list[int] = field(default_factory=list)
    start_ms: list[int] = field(default_factory=list)
    speed: list[float] = field(default_factory=list)   # m/s
    route: list[list[int]] = field(default_factory=list)
    dest: list[Place] = field(default_factory=list)
    flags_from: list[int] = field(default_factory=list)  # route index from which TAMPER is set
    silent_from: list[int] = field(default_factory=list)  # route index from which it is not heard

    def add(self, bike: int, start_ms: int, speed: float, route: list[int], dest: Place,
            flags_from: int = 1 << 30, silent_from: int = 1 << 30) -> int:
        self.bike.append(bike)
        self.start_ms.append(start_ms)
        self.speed.append(speed)
        self.route.append(route)
        self.dest.append(dest)
        self.flags_from.append(flags_from)
        self.silent_from.append(silent_from)
        return len(self.bike) - 1


def local_ms(town_day_ms: int, t: int) -> int:
    """Milliseconds since local midnight at simulated time t."""
    return (t - town_day_ms) % DAY_MS


class Planner:
    def __init__(self, town: Town, start_ms: int, end_ms: int, day_start_ms: int,
                 scenario: Scenario, window: int = 0) -> None:
        """Plan [start_ms, end_ms); at start_ms the town's clocks read `day_start_ms` after
        local midnight."""
        self.town, self.start_ms, self.end_ms, self.sc = town, start_ms, end_ms, scenario
        self.midnight = start_ms - day_start_ms  # a local midnight, as a simulated time
        # the same seed plans the same window, whenever it runs; the next window another
        self.rng = np.random.default_rng([town.seed, window])
        self.trips = _Trips()
        self.by_bike: dict[int, list[int]] = {}

    # -- routes ------------------------------------------------------------------------

    def _route(self, a: Place, b: Place) -> tuple[list[int], float]:
        """Crossings from block a to block b, and the length in metres."""
        g = self.town.grid
        start = min(a, key=lambda n: g.blocks(n, b.a))
        end = min(b, key=lambda n: g.blocks(start, n))
        route = g.route(start, end, self.rng)
        return route, (len(route) - 1 + 1.0) * g.block_m  # half a block at each end

    def _ride(self, bike: int, a: Place, b: Place, t0: int, speed: float) -> tuple[int, int]:
        """Plan a ride; its trip number and its arrival time."""
        route, metres = self._route(a, b)
        k = self.trips.add(bike, t0, speed, route, b)
        self.by_bike.setdefault(bike, []).append(k)
        return k, t0 + int(metres / speed * 1000)

    # -- routines ----------------------------------------------------------------------

    def routines(self) -> None:
        """Commutes (morning and evening peaks) and evening errands to a market."""
        town, rng = self.town, self.rng
        n = town.bikes
        markets = [h for h in town.hotspots if h.kind == "market"]
        speed = rng.uniform(12, 25, n) / 3.6
        first_day = (self.start_ms - self.midnight) // DAY_MS
        last_day = (self.end_ms - self.midnight) // DAY_MS
        for day in range(first_day, last_day + 1):
            base = self.midnight + day * DAY_MS
            commute = rng.random(n) < 0.85
            leave = base + np.clip(rng.normal(7.75, 0.6, n), 6, 10) * HOUR_MS
            back = base + np.clip(rng.normal(17.75, 0.8, n), 16, 21) * HOUR_MS
            errand = rng.random(n) < 0.3
            out = base + np.clip(rng.normal(19.5, 0.7, n), 18.5, 22) * HOUR_MS
            stay = rng.uniform(20, 60, n) * MIN_MS
            which = rng.integers(0, len(markets), n)
            for i in range(n):
                home, work = town.home[i], town.work[i]
                if commute[i]:
                    self._ride(i, home, work, int(leave[i]), float(speed[i]))
                    self._ride(i, work, home, int(back[i]), float(speed[i]))
                if errand[i]:
                    shop = town.random_place(rng, near=markets[which[i]].node, blocks=1)
                    _, there = self._ride(i, home, shop, int(out[i]), float(speed[i]))
                    self._ride(i, shop, home, there + int(stay[i]), float(speed[i]))

    def _parked(self, bike: int, t: int) -> Place | None:
        """Where the bike stands at t, or None if it is riding then."""
        place = self.town.home[bike]
        for k in sorted(self.by_bike.get(bike, []), key=lambda k: self.trips.start_ms[k]):
            start = self.trips.start_ms[k]
            if start > t:
                break
            route = self.trips.route[k]
            metres = len(route) * self.town.grid.block_m
            if start + metres / self.trips.speed[k] * 1000 > t:
                return None
            place = self.trips.dest[k]
        return place

    # -- thefts ------------------------------------------------------------------------

    def _night(self, t: int) -> bool:
        h = local_ms(self.midnight, t) / HOUR_MS
        return h >= 22 or h < 5

    def _theft_time(self) -> int:
        lo = self.start_ms + 10 * MIN_MS
        hi = max(lo + MIN_MS, self.end_ms - 4 * HOUR_MS)
        night = self.rng.random() < self.sc.night_share
        for _ in range(500):  # the window may have no night (or no day) in it
            t = int(self.rng.integers(lo, hi))
            if self._night(t) == night:
                break
        return t

    def thefts(self) -> list[Theft]:
        town, rng, sc = self.town, self.rng, self.sc
        count = round(sc.theft_rate * (self.end_ms - self.start_ms) / HOUR_MS)
        out: list[Theft] = []
        taken: set[int] = set()
        every = (self.end_ms - self.start_ms) / max(count, 1)
        for n in range(count):
            # the demo's thefts come one after another from its start, the others at random
            t = (self.start_ms + 15_000 + int(n * every * rng.uniform(0.9, 1.1))
                 if sc.quick_reports else self._theft_time())
            night = self._night(t)
            kinds = ("market", "school", "fence") if night else ("market", "school")
            pool = [b for b in rng.permutation(town.bikes).tolist() if b not in taken]
            parked = [(b, p) for b in pool[:400] if (p := self._parked(b, t)) is not None]
            near = [(b, p) for b, p in parked if town.near_hotspot(p, kinds)]
            if sc.quick_reports:  # parked next to a station: seen within seconds
                near = [(b, p) for b, p in parked if (town.node_station[list(p)] >= 0).any()]
            if not (near or parked):
                continue
            bike, place = (near or parked)[0]
            taken.add(bike)
            # the bike is gone: its owner's later trips do not happen
            mine = self.by_bike.get(bike, [])
            gone = {k for k in mine if self.trips.start_ms[k] >= t}
            self.by_bike[bike] = [k for k in mine if k not in gone]
            for k in gone:
                self.trips.silent_from[k] = 0
            out.append(self._stage(n, bike, place, t, night))
        return out

    def _stage(self, n: int, bike: int, place: Place, t: int, night: bool) -> Theft:
        town, rng, sc = self.town, self.rng, self.sc
        fence = min(town.fences(), key=lambda h: town.grid.blocks(h.node, place.a))
        drop = town.random_place(rng, near=fence.node, blocks=1)
        route, metres = self._route(place, drop)
        speed = float(rng.uniform(25, 35) / 3.6)
        depart = t + int(rng.uniform(0.1, 0.25) * MIN_MS if sc.quick_reports
                         else rng.uniform(1, 5) * MIN_MS)
        on_route = [i for i, node in enumerate(route) if town.node_station[node] >= 0]
        cut = None
        flags_from = silent_from = 1 << 30
        if len(on_route) >= 2 and rng.random() < sc.p_cut:
            j = int(rng.integers(1, len(on_route)))
            flags_from, silent_from = on_route[j], on_route[j] + 1
            cut = depart + int(((flags_from + 0.5) * town.grid.block_m) / speed * 1000)
        first = self.trips.add(bike, depart, speed, route, drop, flags_from, silent_from)
        arrive = depart + int(metres / speed * 1000)
        if sc.quick_reports:
            reported = t + int(rng.uniform(5, 15) * 1000)
        elif night:
            owner = (self.midnight + ((t - self.midnight) // DAY_MS + (local_ms(self.midnight, t)
                     >= 12 * HOUR_MS)) * DAY_MS + int(rng.normal(7.75, 0.4) * HOUR_MS))
            reported = owner + int(rng.uniform(5, 30) * MIN_MS)
        else:
            reported = t + int(rng.uniform(10, 60) * MIN_MS)
        rides = [first]
        move = max(arrive, reported) + int(rng.uniform(20, 90) * MIN_MS)
        if sc.quick_reports:
            move = arrive + int(rng.uniform(1, 4) * MIN_MS)
        buyer = town.random_place(rng)
        while town.grid.blocks(buyer.a, drop.a) < 6:
            buyer = town.random_place(rng)
        route2, metres2 = self._route(drop, buyer)
        gone = 0 if cut is not None else 1 << 30  # a cut tag is never heard again
        rides.append(self.trips.add(bike, move, float(rng.uniform(18, 25) / 3.6), route2, buyer,
                                    silent_from=gone))
        end = move + int(metres2 / self.trips.speed[rides[-1]] * 1000)
        recovered = (end + int(rng.uniform(15, 60) * MIN_MS)
                     if rng.random() < sc.p_recover else None)
        return Theft(case_id=f"SIM-{self.start_ms // MIN_MS % 10**7:07d}-{n + 1:03d}",
                     tag=int(town.tags[bike]), bike=bike, stolen_ms=t, place=place.a,
                     fence=fence.name, night=night, reported_ms=reported,
                     recovered_ms=recovered, cut_ms=cut, trips=rides)

    # -- outages and clocks ------------------------------------------------------------

    def outages(self) -> list[Outage]:
        town, rng, sc = self.town, self.rng, self.sc
        span = self.end_ms - self.start_ms
        count = round(sc.outage_rate * len(town.station_ids) * span / DAY_MS)
        out: list[Outage] = []
        stations = rng.permutation(len(town.station_ids)).tolist()
        for n in range(count):
            sid = town.station_ids[stations[n % len(stations)]]
            kind = str(rng.choice(["power", "uplink", "flap"], p=[0.6, 0.25, 0.15]))
            if kind == "flap":
                cuts = [(rng.uniform(1, 4), rng.uniform(2, 8)) for _ in range(rng.integers(4, 9))]
            elif kind == "power":
                cuts = [(float(np.clip(np.exp(rng.normal(np.log(30), 0.8)), 5, 240)), 0.0)]
            else:
                cuts = [(rng.uniform(10, 90), 0.0)]
            need = sum(d + g for d, g in cuts) * MIN_MS
            if need > span - 10 * MIN_MS:  # a short window: shorter cuts
                scale = (span - 10 * MIN_MS) / need / 2
                cuts = [(d * scale, g * scale) for d, g in cuts]
                need *= scale
            lo = self.start_ms + 5 * MIN_MS
            hi = max(lo + 1, int(self.end_ms - need - 5 * MIN_MS))
            mine = [(o.start_ms, o.end_ms) for o in out if o.station == sid]
            for _ in range(20):  # one outage at a time per station
                t = int(rng.integers(lo, hi))
                if not any(a - MIN_MS < t + need and t < b + MIN_MS for a, b in mine):
                    break
            else:
                continue
            for d, g in cuts:
                out.append(Outage(sid, kind, t, t + int(d * MIN_MS)))
                t += int((d + g) * MIN_MS)
        return sorted(out, key=lambda o: (o.start_ms, o.station))

    def skews(self, outages: list[Outage]) -> dict[str, str]:
        town = self.town
        n = len(town.station_ids) // 20 if self.sc.skewed < 0 else self.sc.skewed
        down = {o.station for o in outages}
        pick = sorted(self.rng.permutation(town.station_ids).tolist(), key=lambda s: s in down)
        return {sid: SKEW_KINDS[i % len(SKEW_KINDS)] for i, sid in enumerate(pick[:n])}

    # -- reads -------------------------------------------------------------------------

    def reads(self, watch: set[int]) -> tuple[Reads, list[Pass]]:
        """Every read heard, and every pass by a station of the `watch` trips (heard or
        not)."""
        town, rng, tr = self.town, self.rng, self.trips
        block = town.grid.block_m
        p_trip, p_idx = [], []
        for k, route in enumerate(tr.route):
            st = town.node_station[route]
            idx = np.flatnonzero(st >= 0)
            p_trip.append(np.full(len(idx), k))
            p_idx.append(idx)
        trip = np.concatenate(p_trip) if p_trip else np.zeros(0, np.int64)
        idx = np.concatenate(p_idx) if p_idx else np.zeros(0, np.int64)
        speed = np.array(tr.speed)[trip]
        start = np.array(tr.start_ms, dtype=np.int64)[trip]
        route_nodes = np.array([tr.route[k][i] for k, i in zip(trip.tolist(), idx.tolist(),
                                                               strict=True)], dtype=np.int64)
        station = town.node_station[route_nodes] if len(trip) else np.zeros(0, np.int64)
        centre = start + ((idx + 0.5) * block / speed * 1000).astype(np.int64)
        silent = idx >= np.array(tr.silent_from)[trip]
        tamper = idx >= np.array(tr.flags_from)[trip]
        half = np.floor(town.range_m / speed).astype(np.int64)  # whole seconds either side
        per = np.where(silent, 0, 2 * half + 1)
        pass_of = np.repeat(np.arange(len(trip)), per)
        offset = np.arange(len(pass_of)) - np.repeat(np.cumsum(per) - per, per) \
            - np.repeat(half, per)
        heard = rng.random(len(pass_of)) < town.p_read
        pass_of, offset = pass_of[heard], offset[heard]
        dist = np.abs(offset) * speed[pass_of] + 5.0
        rssi = (-40 - 45 * dist / town.range_m + rng.normal(0, 3, len(dist))).clip(-127, -1)
        ts = centre[pass_of] + offset * 1000 + rng.integers(0, 1000, len(pass_of))
        keep = (ts >= self.start_ms) & (ts < self.end_ms)
        order = np.argsort(ts[keep], kind="stable")
        p = pass_of[keep][order]
        reads = Reads(station[p], town.tags[np.array(tr.bike, dtype=np.int64)[trip[p]]],
                      ts[keep][order], rssi[keep][order].astype(np.int8),
                      np.where(tamper[p], TAMPER, 0).astype(np.uint16))
        counts = np.bincount(pass_of[keep], minlength=len(trip))
        passes = [Pass(trip=int(trip[i]), station=town.station_ids[int(station[i])],
                       at_ms=int(centre[i]), reads=int(counts[i]),
                       tamper=bool(tamper[i] and not silent[i]))
                  for i in np.flatnonzero(np.isin(trip, list(watch))).tolist()]
        return reads, passes


def plan(town: Town, start_ms: int, end_ms: int, day_start_ms: int, scenario: Scenario,
         window: int = 0) -> Plan:
    """Everything that happens in [start_ms, end_ms), the town's clocks reading
    `day_start_ms` after local midnight at start_ms; `window` numbers the windows of a
    run that goes on."""
    p = Planner(town, start_ms, end_ms, day_start_ms, scenario, window)
    p.routines()
    thefts = p.thefts()
    outages = p.outages()
    skews = p.skews(outages)
    stolen_trips = {k: th for th in thefts for k in th.trips}
    reads, passes = p.reads(set(stolen_trips))
    down = _down_mask(town, reads, outages, kinds=("power", "flap"))
    reads = Reads(*(col[~down] for col in (reads.station, reads.tag, reads.ts_ms, reads.rssi,
                                            reads.flags)))
    for ps in passes:
        th = stolen_trips.get(ps.trip)
        if th is None or not start_ms <= ps.at_ms < end_ms:
            continue
        ps.state = next((o.kind for o in outages if o.station == ps.station
                         and o.start_ms <= ps.at_ms < o.end_ms), "up")
        if ps.state in ("power", "flap"):
            ps.reads = 0
        ps.skew = skews.get(ps.station)
        th.passes.append(ps)
    truth = Truth(start_ms=start_ms, end_ms=end_ms, day_start_ms=day_start_ms,
                  stations=len(town.station_ids), bikes=town.bikes, seed=town.seed,
                  thefts=thefts, outages=outages, skews=skews)
    return Plan(town, start_ms, end_ms, reads, truth)


def _down_mask(town: Town, reads: Reads, outages: list[Outage],
               kinds: tuple[str, ...]) -> np.ndarray:
    """Reads at a station that is off (its power cut) when they would be heard."""
    mask = np.zeros(len(reads.ts_ms), dtype=bool)
    index = {sid: i for i, sid in enumerate(town.station_ids)}
    for o in outages:
        if o.kind in kinds:
            mask |= ((reads.station == index[o.station]) & (reads.ts_ms >= o.start_ms)
                     & (reads.ts_ms < o.end_ms))
    return mask
