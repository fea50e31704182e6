"""The hot path, in one place: a group of MQTT messages in, one transaction out.

    split       the messages of stations that heard a stolen tag first, as a group
                of their own (the express lane); those that come while a take is
                stored, in the transaction in hand, which then ends after the part it
                writes (`hold`, `parts`)
    decode      every payload into a ReadBatch, or a rejection with its reason
    dedupe      drop (station, boot, seq) seen before: memory window, then the
                seen_batches table (the database decides; the window saves a trip)
    match       all tags of the group against the stolen snapshot in one call
    fold        reads into station visit segments (ingest.visits), committed as one
                visit-log row (ingest.visitlog); stolen tags' segments straight to visits
    alert       one alert per stolen tag's visit (alerts.engine), outbox row included
    health      heartbeats, status and reads move each station's last-heard time

`Pipeline.decode` decodes a group, with no I/O (outside SQLite's write turn);
`Pipeline.store` runs the rest as one plain function (`_write`, on SQLite whole
in the database's thread: registry.db.in_transaction) and commits once; only then
may the caller acknowledge the group's messages to the broker (DESIGN.md decision
3). If the transaction fails, the in-memory state is put back as it was (what it alerted is
remembered only once committed), and the caller stores the same decoded group
again: nothing was acknowledged, nothing is lost.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from sqlalchemy import Connection, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.engine import (
    KIND_IMPOSSIBLE,
    KIND_STOLEN,
    KIND_TAMPER,
    Flagged,
    RaisedAlert,
    Sighting,
    Vehicles,
    raise_alert,
    raise_flagged,
)
from alerts.forecast import EMPTY
from alerts.geo import distance_km_array
from ingest.batch import FLAG_TAMPER, ReadBatch, gather
from ingest.codec import BINARY_MAGIC, binary_tags, decode_many
from ingest.errors import Reason, Rejected
from ingest.health import StationHealth
from ingest.metrics import Metrics
from ingest.visitlog import pack, segment_rows, upsert_segments
from ingest.visits import Segments, VisitTracker
from registry.db import in_transaction
from registry.imports import NAME_RE
from registry.models import RejectRecord, Station, Vehicle, Visit, VisitLog
from registry.snapshot import StolenSet, StolenSetHolder
from registry.sql import insert_ignore, insert_new_keys
from registry.stations import StationInfo, coordinates
from registry.tags import from_db

log = logging.getLogger(__name__)

REJECT_PAYLOAD_MAX = 64 * 1024
# Stations closer than this may both hear a bike between them: no impossible travel there.
IMPOSSIBLE_MIN_KM = 0.5
ROUTES_KEPT = 100_000  # topics remembered (Pipeline._route)
# A group's stolen sightings go first (Pipeline.split) only when the rest of it is at
# least this many messages: a smaller rest takes a few ms, about what a second
# transaction costs.
EXPRESS_MIN_REST = 32
# Messages taken out of turn from the inbox's backlog for its sightings, per group.
PULL_MOST = 64
# A take is written in parts of at most this many messages (`parts`), and its
# transaction ends after the part in hand when a sighting is held (`store`): a take of
# 1,000 held SQLite's write lock some 50 ms at half load, and a sighting that came
# meanwhile waited for all of it. A transaction for every part cost the worker a
# tenth of what it carried: each commit writes the same index pages to the log again.
PART_MOST = 250
# Every group's statements, built once (registry.sql's note says why).
_LOG_SEGMENTS = insert(VisitLog)
_KEEP_REJECTS = insert(RejectRecord)


@dataclass(slots=True)
class Inbound:
    """One MQTT message as the network thread hands it over. Not frozen: a frozen
    dataclass's `__init__` sets each field through `object.__setattr__`, 0.8 µs a
    message against 0.3, in the network thread; and the event loop notes on it
    whether it holds a stolen tag (`Pipeline._sightings`)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_ms: int
    connection: int = 0  # which connection it came on: an ack goes back on that one only
    stored: bool = False  # stored out of turn already (Inbox.stand_in): only to be acked
    # The stolen snapshot's version it was looked into with (-1: not yet), and whether
    # it held a stolen tag then: the watcher, `split` and `parts` look at the same
    # messages, and each is looked into once (`Pipeline._sightings`).
    looked: int = -1
    sighting: bool = False


@dataclass(slots=True)
class GroupResult:
    """What a committed group changed: for the metrics, the acks and the outbox."""

    received: int = 0  # read payloads: each a batch, a duplicate or a reject
    reads: int = 0
    batches: int = 0
    duplicates: int = 0
    unknown_station_batches: int = 0
    skewed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rejected_reads: dict[str, int] = field(default_factory=dict)
    alerts: list[RaisedAlert] = field(default_factory=list)
    alert_kinds: dict[str, int] = field(default_factory=dict)
    # What this transaction wrote that the pipeline remembers once it commits (remembered
    # before, a failed transaction's were skipped by its retry, and lost): visits
    # alerted (Pipeline._alerted), stations recorded as unknown.
    alerted: list[tuple[object, ...]] = field(default_factory=list)
    unknown_recorded: list[str] = field(default_factory=list)
    parts: int = 0  # how many of the parts given to `Pipeline.store` it wrote

    def add(self, other: GroupResult) -> None:
        """Count `other` (another group of the same transaction) in this one."""
        for name in ("received", "reads", "batches", "duplicates", "unknown_station_batches",
                     "skewed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.rejected, other.rejected),
                             (self.rejected_reads, other.rejected_reads),
                             (self.alert_kinds, other.alert_kinds)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        self.alerts += other.alerts
        self.alerted += other.alerted
        self.unknown_recorded += other.unknown_recorded

    def copy(self) -> GroupResult:
        return replace(self, rejected=dict(self.rejected),
                       rejected_reads=dict(self.rejected_reads), alerts=list(self.alerts),
                       alert_kinds=dict(self.alert_kinds), alerted=list(self.alerted),
                       unknown_recorded=list(self.unknown_recorded))


@dataclass(slots=True)
class Decoded:
    """A group as `Pipeline.decode` leaves it for `Pipeline.store`."""

    batches: list[tuple[ReadBatch, int, bytes]] = field(default_factory=list)
    rejects: list[dict[str, object]] = field(default_factory=list)
    heartbeats: list[tuple[str, int]] = field(default_factory=list)
    statuses: list[tuple[str, str, int]] = field(default_factory=list)
    # What decoding counted (rejects, repeats within the memory window): each attempt
    # to store starts from a copy of it.
    counted: GroupResult = field(default_factory=GroupResult)


class Pipeline:
    def __init__(self, engine: AsyncEngine, root: str, holder: StolenSetHolder,
                 health: StationHealth, metrics: Metrics, clock: Callable[[], int], *,
                 gap_ms: int = 60_000, late_after_ms: int = 300_000,
                 impossible_kmh: float = 120.0, dedupe_window: int = 50_000) -> None:
        self.engine = engine
        self.root = root.split("/")
        self.holder = holder
        self.health = health
        self.metrics = metrics
        self.clock = clock
        self.late_after_ms = late_after_ms
        self.tracker = VisitTracker(gap_ms)
        self.directory: dict[str, StationInfo] = {}
        # A memory of recent keys only saves the database a look at a repeat; the
        # seen_batches table decides. 50,000 keys: a few seconds of a busy town.
        self._seen: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._seen_max = dedupe_window
        self._alerted: OrderedDict[tuple[object, ...], None] = OrderedDict()
        # Decoded sightings pulled from the inbox while a take is stored (`hold`): the
        # event loop appends, the database's thread takes (deque ends are thread-safe).
        self._held: deque[Decoded] = deque()
        self.vehicles = Vehicles()
        self.impossible_kmh = impossible_kmh
        self._coords_key: tuple[int, int] | None = None
        self._coords = (np.empty(0), np.empty(0))
        self._recorded_unknown: set[str] = set()
        self._routes: dict[str, tuple[str, str, bool] | None] = {}
        self.forecast = EMPTY  # swapped in by the worker (alerts.forecast)
        # zone -> the webhooks that take its alerts (alerts.webhook)
        self.webhooks: Callable[[str], Sequence[str]] = lambda _zone: ()

    # -- decode: pure, no I/O -------------------------------------------------

    def decode(self, msgs: list[Inbound],
               keys: set[tuple[str, int, int]] | None = None) -> Decoded:
        """A group's payloads decoded: no I/O, so no write turn is needed for it (on
        SQLite the materializer's upserts run meanwhile, in their own thread). `keys`,
        where given, holds the batch keys of the group's parts decoded before: a repeat
        of one of them is a duplicate here too (the database cannot tell a repeat
        received in the same millisecond, in the same transaction)."""
        out = Decoded()
        result = out.counted
        keys = set() if keys is None else keys
        reads: list[tuple[Inbound, str]] = []
        for m in msgs:
            route = self._route(m.topic)
            if route is None:
                continue  # not ours (subscriptions are exact, so this is a broker quirk)
            station, kind, named_well = route
            if kind == "status":
                text = m.payload.decode("utf-8", "replace").strip()
                if text in ("online", "offline"):
                    out.statuses.append((station, text, m.received_ms))
                continue
            if kind == "heartbeat":
                out.heartbeats.append((station, m.received_ms))
                continue
            if kind != "reads":
                continue
            result.received += 1
            if not named_well:
                self._reject(out, result, m, station[:64], Rejected(
                    Reason.BAD_VALUE, "station id in the topic breaks [A-Za-z0-9._-]{1,64}"))
            else:
                reads.append((m, station))
        decoded = decode_many([(m.payload, s, m.received_ms) for m, s in reads])
        for (m, station), batch in zip(reads, decoded, strict=True):
            if isinstance(batch, Rejected):
                self._reject(out, result, m, station, batch)
                continue
            if batch.bad_tag or batch.bad_value:
                self._reject_reads(out, result, m, station, batch)
            key = batch.key
            if key in self._seen or key in keys:
                result.duplicates += 1
                continue
            keys.add(key)
            out.batches.append((batch, m.received_ms, m.payload))
        return out

    def _route(self, topic: str) -> tuple[str, str, bool] | None:
        """(station, kind, whether the station id is well formed) of a topic under our
        root, None for any other; remembered, as a town's topics are few and repeat."""
        try:
            return self._routes[topic]
        except KeyError:
            pass
        levels = topic.split("/")
        n = len(self.root)
        route = None
        if len(levels) == n + 3 and levels[:n] == self.root:
            station = levels[n + 1]
            route = (station, levels[n + 2], NAME_RE.fullmatch(station) is not None)
        if len(self._routes) >= ROUTES_KEPT:  # a flood of made-up station ids
            self._routes.clear()
        self._routes[topic] = route
        return route

    @staticmethod
    def _reject_reads(out: Decoded, result: GroupResult, m: Inbound, station: str,
                      batch: ReadBatch) -> None:
        for reason, count in ((Reason.BAD_TAG, batch.bad_tag),
                              (Reason.BAD_VALUE, batch.bad_value)):
            if count:
                out.rejects.append(_reject_row(m, station, reason, count,
                                               f"{count} read(s) dropped", batch.boot,
                                               batch.seq))
                result.rejected_reads[reason.value] = (
                    result.rejected_reads.get(reason.value, 0) + count)

    @staticmethod
    def _reject(out: Decoded, result: GroupResult, m: Inbound, station: str,
                rej: Rejected) -> None:
        out.rejects.append(_reject_row(m, station, rej.reason, 0, rej.detail, rej.boot,
                                       rej.seq))
        result.rejected[rej.reason.value] = result.rejected.get(rej.reason.value, 0) + 1

    # -- the express lane ------------------------------------------------------

    def split(self, msgs: list[Inbound], later: Sequence[Inbound] = (), new: int = 0,
              ) -> tuple[list[list[Inbound]], list[int]]:
        """The group as the transactions to run, in this order; and which of `later`
        (messages received after the group, still in the inbox) the first one takes.

        The messages of the stations that heard a stolen tag go first, in a
        transaction of their own, so that their alerts wait for them alone and not
        for the whole group. A station's messages stay together and in order, so its
        visits fold as they would in one group. Only a tag heard at two stations in
        one group may see its reads at the other station folded after newer ones:
        they are then merged as late reads (PROTOCOL.md section 3), and not looked at
        for impossible travel. Binary batches only (ingest.codec.binary_tags): looking
        into a JSON batch costs its decoding, so it keeps the group's pace.

        Behind a backlog, a sighting among `later[new:]` (not looked into before) joins
        the first transaction too, with its station's messages before it, when they
        are few (`_pulled`); the caller leaves stand-ins in the inbox for them
        (`Inbox.stand_in`), acknowledged in their turn."""
        if len(self.holder.current) == 0 or len(msgs) <= EXPRESS_MIN_REST:
            return [msgs], []
        station = [self._station(m.topic) for m in msgs]
        heard = {station[i] for i in self._sightings(msgs)}
        pulled = self.pull_sightings(later, new)
        heard.update(self._station(later[i].topic) for i in pulled)
        if not heard:  # only sightings deep in the backlog: they wait for their turn
            return [msgs], []
        express = [m for m, s in zip(msgs, station, strict=True) if s in heard]
        rest = [m for m, s in zip(msgs, station, strict=True) if s not in heard]
        taken = [later[i] for i in pulled]
        if len(rest) < EXPRESS_MIN_REST:
            return [[*msgs, *taken]], pulled
        return [[*express, *taken], rest], pulled

    def pull_sightings(self, later: Sequence[Inbound], new: int) -> list[int]:
        """Which of `later` (the inbox's messages) to store out of turn: the sightings
        among `later[new:]` (not looked into before), each with its station's messages
        before it, when they are few (`_pulled`)."""
        sightings = self._sightings(later[new:])
        return self._pulled(later, [i + new for i in sightings]) if sightings else []

    def _sightings(self, msgs: Sequence[Inbound]) -> list[int]:
        """Indices of the binary batches among `msgs` that hold a stolen tag, ascending.
        Only messages not looked into with this snapshot are; the verdict is noted on
        each (`Inbound.looked`)."""
        snapshot = self.holder.current
        if len(snapshot) == 0 or not msgs:
            return []
        version = snapshot.version
        unseen = [m for m in msgs if m.looked != version]
        if unseen:
            tags, of = binary_tags([m.payload for m in unseen])
            hit, _ = snapshot.match(tags)
            stolen = set(of[hit].tolist())
            for i, m in enumerate(unseen):
                m.looked, m.sighting = version, i in stolen
        return [i for i, m in enumerate(msgs) if m.sighting]

    def hold(self, msgs: list[Inbound]) -> None:
        """Sightings pulled from the inbox while a take is being stored: decoded now, and
        written at the end of the take's transaction in hand (`store(..., held=True)`),
        after its part (`parts` says where that may be), their stations' messages
        before them in the inbox with them."""
        self._held.append(self.decode(msgs))

    @property
    def holding(self) -> bool:
        return bool(self._held)

    @staticmethod
    def _pulled(later: Sequence[Inbound], sightings: list[int]) -> list[int]:
        """Which of `later` go out of turn: for each of the `sightings` (indices, in
        order), the messages of its topic up to it, while all stay within
        `PULL_MOST`. Behind a deep backlog a station has many messages before its
        sighting: it then waits for its turn, rather than making the first
        transaction as long as the groups it would overtake."""
        wanted = {later[i].topic for i in sightings}
        at: dict[str, list[int]] = {topic: [] for topic in wanted}
        for j, m in enumerate(later):
            # A stand-in's message was pulled before: it is stored, or held, already.
            if m.topic in wanted and not m.stored:
                at[m.topic].append(j)
        upto: dict[str, int] = {}  # topic -> how many of its messages go
        total = 0
        for i in sightings:
            topic = later[i].topic
            count = bisect.bisect_right(at[topic], i)
            more = count - upto.get(topic, 0)
            if total + more <= PULL_MOST:
                upto[topic] = count
                total += more
        return sorted(j for topic, k in upto.items() for j in at[topic][:k])

    def _station(self, topic: str) -> str | None:
        route = self._route(topic)
        return None if route is None else route[0]

    def parts(self, group: list[Inbound]) -> list[list[Inbound]]:
        """`group` cut into parts of at most `PART_MOST` messages, as even as can be, in
        order: where its transaction may end for a sighting held meanwhile (`store`).

        Only a group where no read batch may hold a stolen tag is cut: the sighting,
        written after the part in hand (or before the first, Worker._group), goes
        before its station's messages in the parts after it, and only reads of bikes
        not stolen may be folded out of order (older reads join the visit open at their
        station, VisitTracker.fold; an alert would be dated by the newer ones). So not
        the express lane's group, nor one with a JSON batch, not looked into before
        decoding (`split`)."""
        if len(group) <= PART_MOST or self._sightings(group) or any(
                (route := self._route(m.topic)) is not None and route[1] == "reads"
                and m.payload[:2] != BINARY_MAGIC for m in group):
            return [group]
        size = -(-len(group) // -(-len(group) // PART_MOST))
        return [group[i:i + size] for i in range(0, len(group), size)]

    # -- one transaction -------------------------------------------------------

    async def process(self, msgs: list[Inbound]) -> GroupResult:
        """Decode, write and commit a group (`decode`, then `store`)."""
        return await self.store(self.decode(msgs))

    async def store(self, *parts: Decoded, held: bool = False) -> GroupResult:
        """Write and commit decoded parts of a take, in order, and with `held` the
        sightings held meanwhile (`hold`); what they changed, together. With `held`,
        the transaction ends after the part in hand once a sighting is held, and
        writes it then: `parts` in the result says how many were written, and the
        caller stores the rest again. Raises on a database
        error, with the in-memory state unchanged (the held sightings held again), so
        that the caller can retry with the same group.

        The transaction is one plain function (`_write`), which on SQLite runs whole in
        the database's thread (registry.db.in_transaction); what else the pipeline
        keeps in memory (station health, what was alerted and seen, the metrics) is
        changed here, in the event loop's thread, once it committed."""
        saved = self.tracker.saved()
        taken: list[Decoded] = []  # held sightings the transaction took, in order
        try:
            written = await in_transaction(self.engine, self._write, parts,
                                           taken if held else None)
        except BaseException:
            self.tracker.restore(saved)
            self._held.extendleft(reversed(taken))
            raise
        total = GroupResult(parts=len(written) - len(taken))
        done = [*parts[:total.parts], *taken]
        for part, (result, batches) in zip(done, written, strict=True):
            self._heard(part, batches)
            for key in result.alerted:
                self._remember_alerted(key)
            self._recorded_unknown.update(result.unknown_recorded)
            for batch, _, _ in part.batches:
                self._seen[batch.key] = None
            total.add(result)
        while len(self._seen) > self._seen_max:
            self._seen.popitem(last=False)
        self._count(total)
        return total

    def _write(self, conn: Connection, parts: tuple[Decoded, ...], taken: list[Decoded] | None,
               ) -> list[tuple[GroupResult, list[tuple[ReadBatch, int, bytes]]]]:
        """The transaction: the parts, then, where `taken` is given, the sightings held
        meanwhile (each put in `taken`), after the part in hand once one is held; for
        each part written, what it changed and its new batches. Held sightings are
        taken here, as late as can be: some came during these parts; those held while
        they are written wait for the next transaction, so that a run of sightings does
        not keep the first one's commit waiting (one took 26 ms more, probed)."""
        written = []
        for decoded in parts:
            written.append(self._write_group(conn, decoded))
            if taken is not None and self._held:
                break  # a sighting waits: the transaction ends with it
        if taken is not None:
            for _ in range(len(self._held)):
                taken.append(self._held.popleft())
                written.append(self._write_group(conn, taken[-1]))
        return written

    def _write_group(self, conn: Connection, decoded: Decoded,
                     ) -> tuple[GroupResult, list[tuple[ReadBatch, int, bytes]]]:
        result = decoded.counted.copy()  # a retry starts again from what decoding found
        batches = self._dedupe(conn, decoded.batches, result)
        self._stations(conn, decoded, batches, result)
        if batches:
            self._reads(conn, batches, result)
        if decoded.rejects:
            conn.execute(_KEEP_REJECTS, decoded.rejects)
        return result, batches

    def _dedupe(self, conn: Connection, batches: list[tuple[ReadBatch, int, bytes]],
                result: GroupResult) -> list[tuple[ReadBatch, int, bytes]]:
        if not batches:
            return []
        new = insert_new_keys(conn, [(*b.key, r) for b, r, _ in batches])
        fresh = [x for x in batches if x[0].key in new]
        result.duplicates += len(batches) - len(fresh)
        return fresh

    def _heard(self, decoded: Decoded, batches: list[tuple[ReadBatch, int, bytes]]) -> None:
        for station, text, at in decoded.statuses:
            self.health.status(station, text, at)
        for station, at in decoded.heartbeats:
            self.health.heard(station, at)
        for batch, received, _ in batches:
            self.health.heard(batch.station, received, read=True)

    def _stations(self, conn: Connection, decoded: Decoded,
                  batches: list[tuple[ReadBatch, int, bytes]], result: GroupResult) -> None:
        for batch, _, _ in batches:
            info = self.directory.get(batch.station)
            if info is None or not info.imported:
                result.unknown_station_batches += 1
        heard = {s for s, _, _ in decoded.statuses} | {s for s, _ in decoded.heartbeats} | {
            b.station for b, _, _ in batches}
        unknown = [s for s in heard if s not in self.directory and s not in self._recorded_unknown
                   and NAME_RE.fullmatch(s)]
        if unknown:
            # PROTOCOL.md section 1: a station that was never imported is recorded as unknown.
            conn.execute(insert_ignore(conn, Station), [
                {"id": s, "name": "", "zone": "unassigned", "imported": False} for s in unknown])
            result.unknown_recorded += unknown

    def _reads(self, conn: Connection, batches: list[tuple[ReadBatch, int, bytes]],
                     result: GroupResult) -> None:
        lengths = np.array([len(b) for b, _, _ in batches], dtype=np.int64)
        reads = gather([b for b, _, _ in batches])
        tag, ts, rssi, flags = reads.tag, reads.ts_ms, reads.rssi, reads.flags
        station = np.repeat(np.array([self.tracker.station_index(b.station)
                                      for b, _, _ in batches], dtype=np.int32), lengths)
        received = np.repeat(np.array([r for _, r, _ in batches], dtype=np.int64), lengths)
        result.reads = len(tag)
        result.batches = len(batches)
        result.skewed = sum(b.skewed for b, _, _ in batches)
        if not len(tag):
            return
        segs = self.tracker.fold(tag, station, ts, rssi)
        snapshot = self.holder.current
        self.vehicles.at_version(snapshot.version)
        read_idx, entry = snapshot.match(tag)  # the one membership test of the group
        stolen = np.zeros(len(segs), dtype=np.bool_)
        stolen[segs.read_seg[read_idx]] = True
        key_first = self._write_visits(conn, segs, stolen)
        self._alerts(conn, snapshot, read_idx, entry, tag, ts, received, segs, key_first,
                           result)
        tampered = segs.read_seg[(flags & FLAG_TAMPER) != 0]
        impossible = self._impossible(segs)
        if len(tampered) or impossible.any():
            self._flagged(conn, segs, tampered, impossible, received, snapshot, result)

    def _write_visits(self, conn: Connection, segs: Segments, stolen: np.ndarray) -> np.ndarray:
        """Make the segments durable; returns each one's visit key (first_ms) as stored.

        Stolen tags' segments go straight into `visits` (their alert reads the
        trajectory in this transaction); late ones are merged there (`_late_keys`);
        all the others go to the visit log as one row (ingest.visitlog)."""
        key_first = segs.first_ms.copy()
        names = self.tracker.station_names()
        normal = ~segs.late
        direct = np.flatnonzero(normal & stolen)
        logged = np.flatnonzero(normal & ~stolen)
        if len(logged):
            conn.execute(_LOG_SEGMENTS, pack(segment_rows(segs, logged), names))
        if len(direct):
            upsert_segments(conn, segment_rows(segs, direct), names)
        late = np.flatnonzero(segs.late)
        if len(late):
            key_first[late] = self._late_keys(conn, segs, late, names)
            rows = segment_rows(segs, late)
            rows["first"] = key_first[late]
            upsert_segments(conn, rows, names)
        return key_first

    def _late_keys(self, conn: Connection, segs: Segments, late: np.ndarray,
                   names: list[str]) -> np.ndarray:
        """For each late segment (reads that came after newer ones), the key of the
        stored visit its time falls in, within the gap (PROTOCOL.md section 3), the
        earliest if several, else its own first_ms: a visit of its own. Upserted with
        that key, its reads fold into that visit. One query for all: a tag has at most
        one late segment in a group (its first, VisitTracker.fold), and the loop of a
        query each cost the hot path 1 to 2 ms a segment under load."""
        gap = self.tracker.gap_ms
        tags = segs.tag[late].view(np.int64)
        first, last = segs.first_ms[late], segs.last_ms[late]
        stored: dict[tuple[int, str], list[tuple[int, int]]] = {}
        for tag, station, v_first, v_last in conn.execute(
                select(Visit.tag, Visit.station, Visit.first_ms, Visit.last_ms).where(
                    Visit.tag.in_(np.unique(tags).tolist()),
                    Visit.first_ms <= int(last.max()) + gap,
                    Visit.last_ms >= int(first.min()) - gap)):
            stored.setdefault((tag, station), []).append((v_first, v_last))
        keys: np.ndarray = first.copy()
        for i, (tag, station, f, t) in enumerate(zip(
                tags.tolist(), segs.station[late].tolist(), first.tolist(), last.tolist(),
                strict=True)):
            near = [v_first for v_first, v_last in stored.get((tag, names[station]), ())
                    if v_first <= t + gap and v_last >= f - gap]
            if near:
                keys[i] = min(near)
        return keys

    def _alerts(self, conn: Connection, snapshot: StolenSet, read_idx: np.ndarray,
                entry: np.ndarray, tag: np.ndarray, ts: np.ndarray, received: np.ndarray,
                segs: Segments, key_first: np.ndarray, result: GroupResult) -> None:
        if not len(read_idx):
            return
        after = ts[read_idx] >= snapshot.stolen_at_ms[entry]  # reads before the theft don't count
        read_idx, entry = read_idx[after], entry[after]
        seen: set[tuple[int, int]] = set()
        now = self.clock()
        for r, e in zip(read_idx.tolist(), entry.tolist(), strict=True):
            seg = int(segs.read_seg[r])
            if (seg, e) in seen:
                continue
            seen.add((seg, e))
            case_id = snapshot.case_ids[e]
            station = self.tracker.station_name(int(segs.station[seg]))
            key = (case_id, station, int(key_first[seg]))
            if key in self._alerted:
                continue
            alert = raise_alert(conn, Sighting(
                case_id, int(tag[r]), station, key[2], int(snapshot.stolen_at_ms[e]),
                int(received[r])), self.directory, now, self.late_after_ms, self.vehicles,
                self.webhooks, self.forecast.next_stations)
            result.alerted.append(key)
            if alert is not None:
                result.alerts.append(alert)
                result.alert_kinds[KIND_STOLEN] = result.alert_kinds.get(KIND_STOLEN, 0) + 1

    def _remember_alerted(self, key: tuple[object, ...]) -> None:
        """Visits alerted already (committed), so repeated reads skip the database (which
        decides)."""
        self._alerted[key] = None
        if len(self._alerted) > 100_000:
            self._alerted.popitem(last=False)

    def _impossible(self, segs: Segments) -> np.ndarray:
        """Per segment: reached from the tag's previous station faster than a bike can go
        (or heard at both at once), at least `IMPOSSIBLE_MIN_KM` apart."""
        out = np.zeros(len(segs), dtype=np.bool_)
        moved = np.flatnonzero((segs.prev_station >= 0) & (segs.prev_station != segs.station)
                               & ~segs.late)
        if not len(moved):
            return out
        lat, lon = self._coordinates()
        a, b = segs.prev_station[moved], segs.station[moved]
        km = distance_km_array(lat[a], lon[a], lat[b], lon[b])
        hours = (segs.first_ms[moved] - segs.prev_last[moved]) / 3_600_000
        with np.errstate(divide="ignore", invalid="ignore"):
            too_fast = (hours <= 0) | (km / hours > self.impossible_kmh)
        out[moved] = (km >= IMPOSSIBLE_MIN_KM) & too_fast  # NaN (no coordinates): False
        return out

    def _coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """lat, lon by the tracker's station index (NaN where unknown), cached until the
        directory or the station list changes."""
        names = self.tracker.station_names()
        key = (id(self.directory), len(names))
        if self._coords_key != key:
            self._coords = coordinates(names, self.directory)
            self._coords_key = key
        return self._coords

    def _flagged(self, conn: Connection, segs: Segments, tampered: np.ndarray,
                 impossible: np.ndarray, received: np.ndarray, snapshot: StolenSet,
                 result: GroupResult) -> None:
        """tamper and impossible_travel alerts, for registered bikes, once per visit."""
        kinds: dict[int, list[str]] = {}
        for i in np.unique(tampered).tolist():
            kinds.setdefault(i, []).append(KIND_TAMPER)
        for i in np.flatnonzero(impossible).tolist():
            kinds.setdefault(i, []).append(KIND_IMPOSSIBLE)
        tags = segs.tag[list(kinds)]
        registered = {from_db(t) for t in (conn.execute(
            select(Vehicle.tag).where(Vehicle.tag.in_(np.unique(tags).view(np.int64).tolist()))
        )).scalars()}
        hit, entry = snapshot.match(tags)
        cases = dict(zip(hit.tolist(), (snapshot.case_ids[e] for e in entry.tolist()),
                         strict=True))
        seg_received = np.full(len(segs), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(seg_received, segs.read_seg, received)
        now = self.clock()
        for n, (i, seg_kinds) in enumerate(kinds.items()):
            tag = int(segs.tag[i])
            if tag not in registered:
                continue
            station = self.tracker.station_name(int(segs.station[i]))
            for kind in seg_kinds:
                key = (kind, station, int(segs.first_ms[i]), tag)
                if key in self._alerted:
                    continue
                prev = None
                if kind == KIND_IMPOSSIBLE:
                    prev = (self.tracker.station_name(int(segs.prev_station[i])),
                            int(segs.prev_first[i]), int(segs.prev_last[i]))
                alert = raise_flagged(conn, Flagged(
                    kind, tag, station, key[2], int(seg_received[i]), cases.get(n), prev),
                    self.directory, now, self.late_after_ms, self.vehicles, self.webhooks)
                result.alerted.append(key)
                if alert is not None:
                    result.alerts.append(alert)
                    result.alert_kinds[kind] = result.alert_kinds.get(kind, 0) + 1

    def _count(self, r: GroupResult) -> None:
        m = self.metrics
        m.received.inc(r.received)
        m.reads.inc(r.reads)
        m.batches.inc(r.batches)
        m.duplicates.inc(r.duplicates)
        m.unknown_station.inc(r.unknown_station_batches)
        m.clock_skew.inc(r.skewed)
        for reason, n in r.rejected.items():
            m.rejected.labels(reason).inc(n)
        for reason, n in r.rejected_reads.items():
            m.rejected_reads.labels(reason).inc(n)
        for kind, n in r.alert_kinds.items():
            m.alerts.labels(kind).inc(n)


def _reject_row(m: Inbound, station: str, reason: Reason, reads: int, detail: str,
                boot: int | None, seq: int | None) -> dict[str, object]:
    return {"received_ms": m.received_ms, "station": station, "reason": reason.value,
            "reads": reads, "detail": detail[:300], "boot": boot, "seq": seq,
            "payload": m.payload[:REJECT_PAYLOAD_MAX]}
