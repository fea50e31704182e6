"""The durable outbox: every alert row not yet published is published, once the
broker acknowledges it, and then marked (DESIGN.md decision 4).

Alerts raised by this worker arrive through `notify` right after their
transaction commits, so the fast path needs no query; a sweep every few
seconds picks up whatever a crash, a failed publish or another worker left
behind. A receiver that sees an `alert_id` twice drops the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.engine import RaisedAlert
from registry.db import DB_ERRORS, in_transaction, reading, write_turn
from registry.models import Alert

log = logging.getLogger(__name__)

# Calling it publishes; awaiting what it returns waits for the broker's PUBACK and gives
# when it came (wall-clock ms).
Publish = Callable[[str, bytes], Awaitable[int]]
PUBLISH_BATCH = 200  # well under the MQTT client's 1,000 publishes in flight
# Marks of deliveries wait this long for others to share their transaction. On SQLite each
# transaction takes the one write lock: at 40 alerts/s the MQTT and webhook marks made
# some 60 transactions a second between them and held the lock a fifth of the time, which
# the hot path's groups, and the alerts in them, waited for (bench probe at 8,000 batches/s).
# What a crash loses of it is sent again, with the same alert_id, which receivers drop.
MARK_AFTER_S = 0.5

# Built once, as every alert's statements are (registry.sql's note says why).
_MARK = (update(Alert).where(Alert.alert_id == bindparam("aid"))
         .values(published_ms=bindparam("at")))


def _mark(conn: Connection, marks: dict[str, int]) -> None:
    conn.execute(_MARK, [{"aid": a, "at": t} for a, t in marks.items()])


async def pause(seconds: float, stop: asyncio.Event) -> None:
    """Sleep `seconds`, or until `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Outbox:
    def __init__(self, engine: AsyncEngine, root: str, publish: Publish,
                 clock: Callable[[], int], observe_latency: Callable[[float], None],
                 sweep_s: float = 5.0,
                 on_result: Callable[[str, str], None] = lambda _kind, _outcome: None) -> None:
        self.engine = engine
        self.root = root
        self.publish = publish
        self.clock = clock
        self.observe_latency = observe_latency
        self.sweep_s = sweep_s
        self.turn = write_turn(engine)  # marks come with every alert
        self.on_result = on_result  # (kind, delivered | failed)
        self._queue: asyncio.Queue[RaisedAlert] = asyncio.Queue(maxsize=10_000)
        # (alert, when its PUBACK came, wall-clock ms)
        self.on_published: Callable[[RaisedAlert, int], None] | None = None
        self._last_sweep_ms = 0
        self._unmarked: dict[str, int] = {}  # published, not yet marked: alert_id -> when
        self._flushing: asyncio.Future[None] | None = None
        self._stop = asyncio.Event()  # `run`'s: a mark waiting for company goes at once
        self._sent: dict[str, asyncio.Future[int]] = {}  # published by `notify`: PUBACKs

    def notify(self, alerts: list[RaisedAlert]) -> None:
        """Alerts just committed. Each is published at once, up to PUBLISH_BATCH in
        flight this way, and the outbox's task waits for the PUBACK and marks it: when
        the task published them, they waited for it to be scheduled, behind the next
        group's decoding and folding (commit to publish p99 17 ms at 8,000 batches/s)."""
        for a in alerts:
            try:
                self._queue.put_nowait(a)
            except asyncio.QueueFull:  # the sweep finds it in the table; nothing is lost
                return
            if len(self._sent) < PUBLISH_BATCH:
                self._sent[a.alert_id] = asyncio.ensure_future(
                    self.publish(self._topic(a), a.payload))

    def _topic(self, alert: RaisedAlert) -> str:
        return f"{self.root}/alerts/{alert.zone}"

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; what is left is in the table for the next start.

        Alerts waiting together are published together, and marked published by a
        flush of its own, one transaction for many: on SQLite each transaction waits
        for the one write lock, and a mark per alert, waited for before the next
        publish, let alerts queue for seconds behind the hot path (bikewatch bench)."""
        self._stop = stop
        await self._sweep_or_wait(0)
        try:
            while not stop.is_set():
                try:
                    first = await asyncio.wait_for(self._queue.get(), min(self.sweep_s, 0.5))
                except TimeoutError:
                    if self.clock() - self._last_sweep_ms >= self.sweep_s * 1000:
                        await self._sweep_or_wait(self.sweep_s)
                    continue
                batch = [first]
                while not self._queue.empty() and len(batch) < PUBLISH_BATCH:
                    batch.append(self._queue.get_nowait())
                await self._deliver_all(batch)
        finally:
            for waiting in self._sent.values():  # not marked: published again after a restart
                waiting.cancel()
            if self._flushing is not None:
                await self._flushing
            try:
                await self._flush()
            except DB_ERRORS as exc:  # published, not marked: sent again after the restart
                log.warning("alerts published but not marked at shutdown: %s", str(exc)[:200])

    async def _sweep_or_wait(self, older_s: float) -> None:
        """A sweep; if the database is away, the alerts wait in it for the next one."""
        try:
            await self._sweep(older_s)
        except DB_ERRORS as exc:
            log.warning("outbox sweep: database error: %s", str(exc).splitlines()[0][:200])

    async def _deliver_all(self, alerts: list[RaisedAlert]) -> bool:
        """Publish concurrently (QoS 1); True if the broker acknowledged every one."""
        results = await asyncio.gather(*(self._deliver(a) for a in alerts))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush_soon())
        return all(results)

    async def _flush_soon(self) -> None:
        await pause(MARK_AFTER_S, self._stop)
        try:
            await self._flush()
        except DB_ERRORS as exc:  # kept in `_unmarked`: the next flush has them
            log.warning("alerts published but not marked yet: %s", str(exc)[:200])

    async def _deliver(self, alert: RaisedAlert) -> bool:
        sent = self._sent.pop(alert.alert_id, None)
        try:
            acked = await (sent if sent is not None
                           else self.publish(self._topic(alert), alert.payload))
        except (TimeoutError, ConnectionError) as exc:
            log.warning("alert %s not published yet (%s); will retry", alert.alert_id, exc)
            self.on_result(alert.kind, "failed")
            return False
        self.on_result(alert.kind, "delivered")
        # Published when the broker acknowledged it, not when this task got to it.
        self.observe_latency(max(0.0, (acked - alert.received_ms) / 1000))
        if self.on_published is not None:
            self.on_published(alert, acked)
        # Marked after the broker's PUBACK: a crash in between publishes it again, with
        # the same alert_id, which receivers drop.
        self._unmarked[alert.alert_id] = acked
        return True

    async def _flush(self) -> None:
        """Mark what was published, many alerts a transaction."""
        while self._unmarked:
            marks = dict(self._unmarked)
            async with self.turn:
                await in_transaction(self.engine, _mark, marks)
            for a in marks:
                self._unmarked.pop(a, None)

    async def _sweep(self, older_than_s: float) -> None:
        """Publish what is pending in the table (after a restart, or a failed publish)."""
        self._last_sweep_ms = self.clock()
        cutoff = self._last_sweep_ms - int(older_than_s * 1000)
        async with reading(self.engine).connect() as conn:
            rows = (await conn.execute(
                select(Alert.alert_id, Alert.zone, Alert.payload, Alert.received_ms, Alert.kind)
                .where(Alert.published_ms.is_(None), Alert.raised_ms <= cutoff,
                       Alert.payload != "")
                .order_by(Alert.raised_ms).limit(500))).all()
        pending = [RaisedAlert(r.alert_id, r.zone, r.payload.encode(), r.received_ms, r.kind)
                   for r in rows if r.alert_id not in self._unmarked]
        if pending:
            await self._deliver_all(pending)
