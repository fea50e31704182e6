"""`bikewatch serve`: one worker, its tasks and their lifetimes.

    Worker.run()  ─ TaskGroup
        consume     inbox -> Pipeline.split (stolen sightings first) -> Pipeline.decode
                    -> Pipeline.store (one transaction a group, in the write turn)
                    -> outbox -> ack (the whole take)
        refresh     registry version poll -> new stolen snapshot and station directory;
                    a case just opened -> its bike's visits since the theft (alerts.lookback)
        outbox      publish committed alerts, mark them published
        webhooks    one loop per webhook: POST, retry, dead-letter (alerts.webhook)
        materialize fold the visit log into `visits` (ingest.visitlog)
        health      station health: silence found, transitions stored, operators told
        maintain    dedupe keys past the window, reject store past 10,000, old open visits
        checkpoint  SQLite's write-ahead log copied back, off the hot path (registry.db)
        forecast    relearn where bikes go next from the stored visits (alerts.forecast)
        http        uvicorn: /metrics, the API, the live alert stream (alerts.stream)

Shutdown is leaving the block: `stop` is set (SIGTERM, Ctrl-C), the consumer
finishes the group in hand (commit, then ack), the connection closes, and
whatever was received but not acknowledged stays with the broker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import Callable
from dataclasses import replace

import uvicorn
from prometheus_client import CollectorRegistry
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.engine import KIND_STOLEN, KINDS, RaisedAlert, Vehicles
from alerts.forecast import REFRESH_S as FORECAST_REFRESH_S
from alerts.forecast import learn_from_history
from alerts.lookback import look_back
from alerts.outbox import Outbox
from alerts.stream import AlertStream
from alerts.webhook import WebhookSender
from ingest.clock import Clock, wall_ms
from ingest.config import Settings
from ingest.errors import ConfigError
from ingest.health import HealthPolicy, StationHealth
from ingest.health_store import load_states, newest, store
from ingest.http import bind, build_app
from ingest.metrics import Metrics, StationMetrics, exposition
from ingest.mqtt import Inbox, MqttLink
from ingest.pipeline import Decoded, Inbound, Pipeline
from ingest.visitlog import drain
from registry.db import DB_ERRORS, Checkpointer, open_database, reading, write_turn
from registry.gaps import WINDOW_MS as GAP_WINDOW_MS
from registry.gaps import missing_batches
from registry.lease import HEALTH, Lease
from registry.models import RejectRecord, SeenBatch
from registry.notify import listen
from registry.queries import outbox_backlog
from registry.retention import forget_sightings
from registry.snapshot import StolenSetHolder, load_stolen_set, registry_version
from registry.stations import StationInfo, load_directory

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's malloc.h

REFRESH_S = 0.25      # registry changes reach the hot path within a second (PROTOCOL.md 4)
MAINTAIN_S = 30.0
RETENTION_S = 3_600.0  # sightings past the retention are deleted hourly
GAPS_S = 30.0          # seq gaps (registry.gaps) are looked for this often
OPEN_VISITS_KEPT_MS = 10 * 60_000
# Trajectories of bikes that are not stolen lag the reads by about this much; a longer
# interval folds more of each visit's segments into one row before it is written.
MATERIALIZE_S = 2.0
# Silence is dated exactly by its deadline whatever this is; it bounds how stale
# bikewatch_station_up may be (plus ingest.health.GRACE_MS), and what a crash loses
# of last-heard times.
HEALTH_S = 1.0
# How often the SQLite log is copied back (registry.db.Checkpointer). At full load some
# 5,000 pages a second go into it (1.4 GB in a minute when nothing restarted it).
CHECKPOINT_S = 1.0
OUTBOX_GAUGES_S = 5.0
HEALTH_EVENTS_IN_FLIGHT = 200  # well under the client's 1,000 in-flight publishes
REJECTS_KEPT = 10_000
CONNECT_TIMEOUT_S = 10.0
UNKNOWN = StationInfo.unknown("")


class Worker:
    def __init__(self, settings: Settings, engine: AsyncEngine, clock: Clock = wall_ms,
                 registry: CollectorRegistry | None = None, *,
                 freeze_when_ready: bool = False) -> None:
        # `serve` (and the bench's worker, which mirrors it) freezes what start-up made
        # (freeze_what_started); a test process starts many workers and does not.
        self.freeze_when_ready = freeze_when_ready
        self.settings = settings
        self.engine = engine
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.health = StationHealth(HealthPolicy.from_settings(settings), clock)
        self.station_metrics = StationMetrics(self.health)
        self.holder = StolenSetHolder()
        self.pipeline = Pipeline(engine, settings.mqtt_root, self.holder, self.health,
                                 self.metrics, clock, gap_ms=int(settings.visit_gap_s * 1000),
                                 late_after_ms=int(settings.late_after_s * 1000),
                                 impossible_kmh=settings.impossible_speed_kmh)
        self._turn = write_turn(engine)  # SQLite: one writer at a time (registry.db)
        self.checkpointer = Checkpointer(engine)  # SQLite's log, off the hot path
        self.webhooks = WebhookSender(
            engine, settings.webhooks, clock, timeout_s=settings.webhook_timeout_s,
            max_age_ms=int(settings.webhook_max_age_s * 1000),
            on_result=lambda name, kind, outcome: self.metrics.alert_deliveries.labels(
                kind, f"webhook/{name}", outcome).inc())
        self.pipeline.webhooks = self.webhooks.routes
        self.stream = AlertStream(engine)
        self._channels = ["mqtt", *(f"webhook/{w.name}" for w in settings.webhooks)]
        for channel in self._channels:
            self.metrics.outbox_depth.labels(channel)
            self.metrics.outbox_oldest.labels(channel)
            for kind in KINDS:
                for outcome in ("delivered", "failed", "dead")[:2 if channel == "mqtt" else 3]:
                    self.metrics.alert_deliveries.labels(kind, channel, outcome)
        self._outbox: Outbox | None = None
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        # (alert, when the broker acknowledged it, wall-clock ms)
        self.on_alert: Callable[[RaisedAlert, int], None] | None = None
        self._version = -1
        self.health_lease = Lease(engine, HEALTH, "station health")
        self._gap_zones: set[str] = set()  # zones with a gauge: reset to 0 when healed
        # Received time of the oldest message in hand, None when caught up: the intake lag
        # is computed at scrape time, so it grows while a group waits for the database.
        self._behind_since: int | None = None
        self._storing = False  # a take is being stored (`_watch`)
        self.metrics.intake_lag.set_function(
            lambda: 0 if self._behind_since is None
            else max(0, self.clock() - self._behind_since) / 1000)

    async def run(self) -> None:
        """Run until `stop` is set. Raises ConfigError if the broker cannot be reached."""
        await drain(self.engine)  # what a crashed run committed but did not fold in yet
        await self._refresh()  # learns the forecast too: the directory is new
        inbox = Inbox(asyncio.get_running_loop(), self.settings.receive_maximum,
                      self.metrics.intake_waits.inc)
        link = MqttLink(self.settings, inbox, self.clock)
        sock = bind(self.settings.http_address())
        link.start()
        # The health lease is held until the last transitions are stored, after the rest.
        release, lease = asyncio.Event(), None
        try:
            if not await link.wait_connected(CONNECT_TIMEOUT_S):
                ep = self.settings.mqtt_endpoint()
                why = link.refused or "no answer"
                raise ConfigError("BIKEWATCH_MQTT_URL",
                                  f"cannot connect to {ep.host}:{ep.port} ({why})")
            outbox = Outbox(self.engine, self.settings.mqtt_root, link.publish, self.clock,
                            self.metrics.alert_latency.observe,
                            on_result=lambda kind, outcome: self.metrics.alert_deliveries.labels(
                                kind, "mqtt", outcome).inc())
            outbox.on_published = self.on_alert
            self._outbox = outbox
            app = build_app(self.engine, self.metrics_text, self.settings, self.clock,
                            self.stream, self.stop)
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
            changed = asyncio.Event()  # a registry change was announced
            lease = asyncio.create_task(self.health_lease.run(release), name="health-lease")
            self.ready.set()
            if self.freeze_when_ready:
                freeze_what_started()
            async with asyncio.TaskGroup() as tg:
                consume = tg.create_task(self._consume(inbox, link), name="consume")
                watch = tg.create_task(self._watch(inbox), name="watch")
                # These stop by themselves once `stop` is set, between two transactions:
                # a task cancelled inside one could leave SQLite's write lock taken.
                others = [
                    tg.create_task(self._every(REFRESH_S, self._refresh, changed),
                                   name="refresh"),
                    tg.create_task(listen(self.engine, changed.set, self.stop),
                                   name="registry-notifications"),
                    tg.create_task(outbox.run(self.stop), name="outbox"),
                    tg.create_task(self.webhooks.run(self.stop), name="webhooks"),
                    tg.create_task(self._every(MAINTAIN_S, self._maintain), name="maintain"),
                    tg.create_task(self._every(RETENTION_S, self.forget_sightings),
                                   name="retention"),
                    tg.create_task(self._every(GAPS_S, self._gaps), name="gaps"),
                    tg.create_task(self._every(FORECAST_REFRESH_S, self._learn),
                                   name="forecast"),
                    tg.create_task(self._every(OUTBOX_GAUGES_S, self._outbox_gauges),
                                   name="outbox-gauges"),
                    tg.create_task(self._every(MATERIALIZE_S, self._materialize),
                                   name="materialize"),
                    tg.create_task(self._every(HEALTH_S, lambda: self._health(link)),
                                   name="health"),
                    tg.create_task(self._every(CHECKPOINT_S, self.checkpointer.checkpoint),
                                   name="checkpoint"),
                ]
                http = tg.create_task(server.serve(sockets=[sock]), name="http")
                await self.stop.wait()
                consume.cancel()  # cancellation lands only between groups, see _consume
                watch.cancel()  # what it held is not acknowledged: the broker sends it again
                server.should_exit = True
                await asyncio.wait({consume, watch, http, *others})
            await drain(self.engine)
            await self._health(None)
        finally:
            release.set()
            if lease is not None:
                await asyncio.wait({lease}, timeout=10)
            link.stop()
            sock.close()
            await self.checkpointer.close()

    def metrics_text(self) -> bytes:
        """`/metrics`: the registry's families and the stations'."""
        return exposition(self.registry, self.station_metrics)

    async def _consume(self, inbox: Inbox, link: MqttLink) -> None:
        while True:
            msgs = await inbox.take(self.settings.group_messages)
            # The group must end committed-and-acked or untouched, never halfway:
            # shield it from cancellation, which then takes effect at the next take().
            self.metrics.inflight.set(len(msgs) + len(inbox))
            self._behind_since = msgs[0].received_ms
            self._storing = True
            try:
                await asyncio.shield(self._groups(msgs, link, inbox))
            finally:
                self._storing = False
            if not inbox:  # caught up
                self._behind_since = None

    async def _watch(self, inbox: Inbox) -> None:
        """While a take is being stored, pull the stolen sightings that arrive from the
        inbox (`Pipeline.pull_sightings`), to be written at the end of the take's
        transaction in hand, which then ends after the part it writes (`Pipeline.hold`,
        `Pipeline.store`): a sighting waits for at most `PART_MOST` messages, mostly,
        not for the whole take, its acknowledgements and the next take's decoding. The
        stand-ins left in the inbox are acknowledged in their turn, after that
        transaction committed (`_groups` writes what is still held first)."""
        while True:
            await inbox.arrived()
            if not self._storing:
                continue  # the consumer takes it at once, and `split` looks into it
            later, new = inbox.later()
            pulled = self.pipeline.pull_sightings(later, new)
            if pulled:
                inbox.stand_in(pulled)
                self.pipeline.hold([later[i] for i in pulled])

    async def _groups(self, msgs: list[Inbound], link: MqttLink, inbox: Inbox) -> None:
        """What was taken: stolen sightings first, in a group of their own
        (Pipeline.split), with those of the inbox's backlog, each group committed
        (`_group`) and its alerts sent; then all of it acknowledged, in the order
        received, as MQTT requires of PUBACKs (3.1.1 and 5, section 4.6): a sighting
        taken from the backlog is acknowledged when its stand-in's turn comes.
        Committed and not yet acknowledged, a batch that comes again after a crash is
        a duplicate."""
        if self.pipeline.holding:  # held after the last take's last transaction began
            await self._group([])
        todo = [m for m in msgs if not m.stored]
        groups, pulled = self.pipeline.split(todo, *inbox.later())
        inbox.stand_in(pulled)
        groups = [g for g in groups if g]  # stand-ins only: nothing to write
        for group in groups:
            await self._group(self.pipeline.parts(group))
        link.ack(msgs)

    async def _group(self, parts: list[list[Inbound]]) -> None:
        """Store a group, in parts (Pipeline.parts), with the sightings held meanwhile:
        one transaction, but one that ends after the part in hand when a sighting is
        held, and then another for the rest (Pipeline.store); a sighting held before a
        transaction of a cut group begins goes ahead of its parts, in one of its own.

        Alternated probes at 13,000 batches/s (half load, 2026-11-25): police p90 23
        and 24 ms against 31 and 31, p99 46 and 44 against 52 and 54."""
        with self.metrics.group_seconds.time():
            keys: set[tuple[str, int, int]] = set()  # one group: one window for repeats
            todo = collections.deque(parts)
            cut = len(parts) > 1
            pending: list[Decoded] = []
            while True:
                # Part by part, the watcher looking in between: a sighting it holds goes
                # into a transaction at once, after one part, not after the decoding
                # of the whole take.
                while todo and not self.pipeline.holding:
                    pending.append(self.pipeline.decode(todo.popleft(), keys))
                    await asyncio.sleep(0)
                if not pending and not self.pipeline.holding:
                    break
                delay = 0.1
                while True:
                    try:
                        # A sighting held goes ahead of the materializer's, the
                        # marks' and health's transactions waiting (registry.db.Turn).
                        async with (self._turn.first() if self.pipeline.holding
                                    else self._turn):
                            # The parts of a cut group hold no stolen tag (Pipeline.parts):
                            # a sighting held meanwhile, newer, goes ahead of them,
                            # committed on its own; otherwise after the part in hand.
                            ahead = cut and self.pipeline.holding
                            result = await self.pipeline.store(*([] if ahead else pending),
                                                               held=True)
                        break
                    except DB_ERRORS as exc:
                        # The database is away: keep the group unacknowledged and try
                        # again; the broker holds everything behind it (backpressure).
                        self.metrics.db_retries.inc()
                        log.warning("database error, retrying in %.1fs: %s", delay,
                                    str(exc).splitlines()[0][:200])
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 10.0)
                pending = pending[result.parts:]
                self._deliver(self._committed(result.alerts))

    def _committed(self, alerts: list[RaisedAlert]) -> list[RaisedAlert]:
        """Alerts of reads just committed, stamped with that moment, and
        `bikewatch_alert_commit_seconds` observed: with the PUBACK's time
        (`bikewatch_alert_latency_seconds`) it tells the database's share of the latency
        from the broker's."""
        now = self.clock()
        for a in alerts:
            self.metrics.alert_commit.observe(max(0, now - a.received_ms) / 1000)
        return [replace(a, committed_ms=now) for a in alerts]

    def _deliver(self, alerts: list[RaisedAlert]) -> None:
        """Committed alerts: wake every channel (each also finds them in the table)."""
        if not alerts:
            return
        if self._outbox is not None:
            self._outbox.notify(alerts)
        self.webhooks.notify(alerts)
        self.stream.notify()

    async def _every(self, seconds: float, job: Callable[[], object],
                     wake: asyncio.Event | None = None) -> None:
        """Run `job` every `seconds`, and at once when `wake` is set, until `stop` is."""
        while not self.stop.is_set():
            waits = [asyncio.ensure_future(e.wait()) for e in (self.stop, wake) if e]
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if self.stop.is_set():
                return
            if wake is not None:
                wake.clear()
            try:
                await job()  # type: ignore[misc]
            except DB_ERRORS as exc:
                log.warning("%s: database error: %s", getattr(job, "__name__", "job"),
                            str(exc).splitlines()[0][:200])

    async def _health(self, link: MqttLink | None) -> None:
        """Find silent stations, store the transitions, then tell operators (QoS 1): on
        the holder of the health lease only; the others track the same states."""
        self.health.tick()
        if not self.health_lease.decided.is_set():  # starting: keep what happens for now
            return
        owner = self.health_lease.held
        self.metrics.health_owner.set(owner)
        if not owner:
            self.health.take_pending()
            self.health.take_events()
            return
        if self.health_lease.gained.is_set():  # taken over: catch the database up
            async with self.engine.connect() as conn:
                stored = await newest(conn)
            self.health.reconcile(stored)
            self.health_lease.gained.clear()
        transitions, rows = self.health.take_pending()
        if transitions or rows:
            try:
                async with self._turn, self.engine.begin() as conn:
                    await store(conn, transitions, rows)
            except BaseException:
                self.health.put_back(transitions, rows)
                raise
            for t in transitions:
                self.metrics.station_transitions.labels(
                    self.pipeline.directory.get(t.station, UNKNOWN).zone,
                    "up" if t.up else "down").inc()
        events = self.health.take_events()
        if link is None:
            return
        root = self.settings.mqtt_root
        for start in range(0, len(events), HEALTH_EVENTS_IN_FLIGHT):
            chunk = events[start:start + HEALTH_EVENTS_IN_FLIGHT]
            results = await asyncio.gather(
                *(link.publish(f"{root}/health/{e.zone}", e.payload()) for e in chunk),
                return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                # Best effort: the transitions are stored, and a station still down is
                # reported again after down_repeat_s, so what a broker outage loses recurs.
                log.warning("%d of %d health events not published: %s", len(failed),
                            len(events) - start, failed[0])
                return

    async def _outbox_gauges(self) -> None:
        """Depth and oldest age of what waits for each channel (alerts.outbox, .webhook)."""
        depth, oldest = await outbox_backlog(self.engine)
        now = self.clock()
        for channel in self._channels:
            self.metrics.outbox_depth.labels(channel).set(depth.get(channel, 0))
            first = oldest.get(channel)
            self.metrics.outbox_oldest.labels(channel).set(
                0 if first is None else max(0, now - first) / 1000)

    async def _learn(self) -> None:
        """Relearn where bikes go next from the stored visits (alerts.forecast)."""
        async with reading(self.engine).connect() as conn:
            directory = await load_directory(conn)
        self.pipeline.forecast = await learn_from_history(self.engine, directory, self.clock())

    async def _materialize(self) -> None:
        await drain(self.engine)

    async def _refresh(self) -> None:
        """Swap in a new snapshot when the registry version moved (DESIGN.md decision 2)."""
        now = self.clock()
        expiry = self.holder.current.next_expiry_ms
        async with reading(self.engine).connect() as conn:
            version = await registry_version(conn)
            if version == self._version and (expiry is None or now < expiry):
                return
            snapshot = await load_stolen_set(conn, now)
            directory = await load_directory(conn)
            stored = await load_states(conn, self.health.unknown(directory), self.clock(),
                                       self.health.policy.flap_window_ms)
        self.health.load(directory, stored)
        opened = set(snapshot.case_ids) - set(self.holder.current.case_ids)
        moved = directory.keys() != self.pipeline.directory.keys() or any(
            directory[s] != self.pipeline.directory[s] for s in directory)
        self.holder.current = snapshot
        self.pipeline.directory = directory
        async with reading(self.engine).connect() as conn:  # after the swap: see Vehicles.load
            await self.pipeline.vehicles.load(conn, snapshot.version,
                                              snapshot.tags[:Vehicles.MOST].tolist())
        if moved:  # stations added, moved or removed: the forecast's map with them
            self.pipeline.forecast = await learn_from_history(self.engine, directory,
                                                              self.clock())
        if opened:  # late reports: where was the bike seen since the theft?
            await drain(self.engine)
            alerts = await look_back(self.engine, opened, directory, self.clock(),
                                     int(self.settings.late_after_s * 1000),
                                     self.webhooks.routes, self.pipeline.forecast.next_stations)
            self.metrics.alerts.labels(KIND_STOLEN).inc(len(alerts))
            self._deliver(alerts)
        self.metrics.stolen_tags.set(len(snapshot))
        self._version = snapshot.version
        log.info("registry version %d: %d stolen tags, %d stations", snapshot.version,
                 len(snapshot), len(directory))

    async def _maintain(self) -> None:
        now = self.clock()
        async with self._turn, self.engine.begin() as conn:
            await conn.execute(delete(SeenBatch).where(
                SeenBatch.received_ms < now - int(self.settings.dedupe_hours * 3_600_000)))
            newest = (await conn.execute(select(func.max(RejectRecord.id)))).scalar()
            if newest is not None:
                await conn.execute(delete(RejectRecord).where(
                    RejectRecord.id <= newest - REJECTS_KEPT))
        # Open visits older than this can no longer continue; only a late read could
        # still meet them, and the late path looks in the table anyway.
        self.pipeline.tracker.prune(now - OPEN_VISITS_KEPT_MS)
        give_back_free_memory()


    async def _gaps(self) -> None:
        """Batches missing per zone: derived from the database, the same on every worker."""
        missing = await missing_batches(self.engine, self.clock() - GAP_WINDOW_MS)
        by_zone: dict[str, int] = dict.fromkeys(self._gap_zones, 0)
        for station, n in missing.items():
            zone = self.pipeline.directory.get(station, UNKNOWN).zone
            by_zone[zone] = by_zone.get(zone, 0) + n
        for zone, n in by_zone.items():
            self.metrics.missing_batches.labels(zone).set(n)
        self._gap_zones = set(by_zone)
        if missing:
            worst = sorted(missing.items(), key=lambda kv: -kv[1])[:5]
            log.warning("batches missing in the last %d min: %s", GAP_WINDOW_MS // 60_000,
                        ", ".join(f"{s} {n}" for s, n in worst))

    async def forget_sightings(self) -> int:
        """Delete the sightings past the retention (registry.retention)."""
        cutoff = self.clock() - int(self.settings.sighting_retention_days * 86_400_000)
        deleted = await forget_sightings(self.engine, cutoff)
        if deleted:
            log.info("retention: %d sightings older than %g days deleted", deleted,
                     self.settings.sighting_retention_days)
        return deleted


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, for malloc's tuning calls; None elsewhere (other C libraries have no such
    behaviour or no such calls, and are left alone)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def give_back_free_memory() -> None:
    """Return the free pages of every malloc arena to the system (glibc's malloc_trim).

    The network thread allocates each message in its own arena and the event loop
    frees it, so free chunks gather there that glibc gives back only at the arena's
    top. Called every MAINTAIN_S."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)


def keep_large_buffers_apart() -> None:
    """Give blocks of 64 KiB and more (payloads, reject excerpts, a group's arrays)
    mappings of their own, unmapped when freed.

    glibc starts at 128 KiB, but raises that threshold each time such a block is freed
    (up to 32 MiB); after that, payloads near the 1 MiB limit come from the heap, and
    a heap with live blocks above the freed ones cannot shrink. Measured, a flood of
    malformed payloads (half the traffic, 1 MiB ones among them) for 40,000 messages:
    without this, RSS crept from 118 to 226 MB and was still climbing; with it, it
    stayed between 96 and 171 MB. 64 KiB rather than 128 KiB takes in the 64 KiB
    excerpts kept of rejected payloads."""
    if (libc := _libc()) is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def freeze_what_started() -> None:
    """Leave what start-up made out of the collector's full passes (gc.freeze).

    Once the worker is ready some 130,000 objects are alive (modules, SQLAlchemy's
    and FastAPI's metadata, the app) and stay as long as the process: every full
    collection walked them all, 86 to 128 ms of the event loop each (measured at
    8,000 batches/s, 3 or 4 in 12 s), while alerts waited. Frozen, a full pass walks
    what came after, some 35,000 objects: 20 to 45 ms. What is garbage already is
    collected first."""
    gc.collect()
    gc.freeze()


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    keep_large_buffers_apart()
    engine = await open_database(settings.db_url)
    try:
        worker = Worker(settings, engine, freeze_when_ready=True)
        relay = None if stop is None else asyncio.get_running_loop().create_task(
            _relay(stop, worker.stop), name="stop-relay")
        try:
            await worker.run()
        finally:
            if relay is not None:
                relay.cancel()
    finally:
        await engine.dispose()


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await source.wait()
        target.set()
