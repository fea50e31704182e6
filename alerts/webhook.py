"""Alerts to police webhooks: signed HTTP POSTs, retried until delivered or dead-lettered.

Each alert gets one `deliveries` row per webhook of its zone, written in the
alert's own transaction (alerts.engine), so a crash at any point between
raising and delivering leaves the row pending and the next start sends it.
Each webhook has its own loop: a receiver that is down or slow delays only
itself. A request carries the alert JSON as its body and the Standard
Webhooks headers: `webhook-id` (the alert_id, the same on every retry, for
the receiver to drop repeats), `webhook-timestamp` (seconds) and
`webhook-signature`, one `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` per
configured secret, so a receiver in the middle of a secret rotation accepts
either. A 2xx answer is delivery; anything else, a timeout or a refused
connection is retried with exponential backoff and jitter (1 s doubling to
15 minutes) until `webhook_max_age_s` (72 h) after the alert, then the row is
dead-lettered: counted, listed by `bikewatch deliveries list --state dead`,
and requeued by `bikewatch deliveries retry`. Nothing is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import aiohttp
import orjson
from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks import Webhook

from alerts.engine import RaisedAlert
from alerts.outbox import MARK_AFTER_S, pause
from ingest.config import WebhookReceiver
from registry.db import DB_ERRORS, reading, write_turn
from registry.models import Alert, Delivery, Owner, Vehicle
from registry.privacy import audit
from registry.tags import format_tag, from_db
from registry.tokens import Principal

log = logging.getLogger(__name__)

RETRY_BASE_MS = 1_000
RETRY_CAP_MS = 15 * 60_000
POLL_S = 1.0      # a new alert wakes its loops at once (`notify`); this only bounds a miss
BATCH = 50        # due rows read at a time, per webhook
FRESH_MOST = 10_000  # alerts handed over by `notify` and not yet posted, per webhook

# Statements of every alert's delivery, built once (registry.sql's note says why).
_DUE = (select(Delivery.alert_id, Alert.kind, Delivery.attempts, Delivery.created_ms,
               Alert.payload, Alert.tag)
        .join(Alert, Alert.alert_id == Delivery.alert_id)
        .where(Delivery.channel == bindparam("p_channel"), Delivery.delivered_ms.is_(None),
               Delivery.dead_ms.is_(None), Delivery.next_ms <= bindparam("p_now"))
        .order_by(Delivery.next_ms, Delivery.id).limit(bindparam("p_limit")))
_DUE_WITH_CONTACT = (_DUE.add_columns(Owner.name, Owner.phone)
                     .outerjoin(Vehicle, Vehicle.tag == Alert.tag)
                     .outerjoin(Owner, Owner.id == Vehicle.owner_id))
_RECORD = update(Delivery).where(Delivery.alert_id == bindparam("aid"),
                                  Delivery.channel == bindparam("ch")).values(
    attempts=bindparam("attempts"), last_error=bindparam("error"),
    delivered_ms=bindparam("delivered"), dead_ms=bindparam("dead"), next_ms=bindparam("next"))


def sign(receiver: WebhookReceiver, msg_id: str, timestamp_s: int, body: str) -> str:
    """The `webhook-signature` header: one signature per active secret."""
    when = dt.datetime.fromtimestamp(timestamp_s, tz=dt.UTC)
    return " ".join(Webhook(secret).sign(msg_id, when, body) for secret in receiver.secrets)


def retry_delay_ms(attempts: int, rng: random.Random) -> int:
    """Exponential backoff with jitter: half to all of min(cap, base * 2^(attempts-1))."""
    ceiling = min(RETRY_CAP_MS, RETRY_BASE_MS * 2 ** min(attempts - 1, 30))
    return int(ceiling * rng.uniform(0.5, 1.0))


@dataclass(slots=True, frozen=True)
class _Due:
    alert_id: str  # with the webhook's name, its `deliveries` row
    kind: str
    attempts: int
    created_ms: int
    payload: str
    contact_of: str | None = None  # the vehicle whose owner it carries unmasked


def _with_contact(payload: str, name: str, phone: str) -> str:
    """The alert with its owner whole, for a receiver configured for full contact."""
    doc = orjson.loads(payload)
    doc["owner"] = {"name": name, "phone": phone}
    return orjson.dumps(doc).decode()


class WebhookSender:
    def __init__(self, engine: AsyncEngine, receivers: Sequence[WebhookReceiver],
                 clock: Callable[[], int], *, timeout_s: float = 10.0,
                 max_age_ms: int = 72 * 3_600_000,
                 on_result: Callable[[str, str, str], None] = lambda _n, _k, _o: None) -> None:
        self.engine = engine
        self.receivers = tuple(receivers)
        self.clock = clock
        self.timeout_s = timeout_s
        self.max_age_ms = max_age_ms
        self.turn = write_turn(engine)  # results come with every alert
        self.on_result = on_result      # (webhook, kind, delivered | failed | dead)
        self._wake = {r.name: asyncio.Event() for r in self.receivers}
        # Alerts just committed, per webhook, posted without reading them back (`notify`).
        self._fresh: dict[str, collections.deque[_Due]] = {
            r.name: collections.deque() for r in self.receivers}
        self._rng = random.Random()

    def routes(self, zone: str) -> list[str]:
        """The webhooks that take this zone's alerts (for alerts.engine)."""
        return [r.name for r in self.receivers if r.serves(zone)]

    def notify(self, alerts: Sequence[RaisedAlert] = ()) -> None:
        """New alerts were committed: look now, not at the next poll. Those given are
        posted as they are, without the query for due rows first: it took 2 to 5 ms
        under load, and an alert's webhook came 7 ms after its MQTT copy at p50 (bench,
        13,000 batches/s). A webhook cleared for the owner's contact reads it with the
        row, so its alerts go by the query. Any left out (a full queue) the query finds."""
        for r in self.receivers:
            mine = [a for a in alerts if r.serves(a.zone)]
            if alerts and not mine:
                continue  # none of its zones'
            fresh = self._fresh[r.name]
            if r.contact != "full":
                fresh.extend(_Due(a.alert_id, a.kind, 0, a.received_ms, a.payload.decode())
                             for a in mine[:FRESH_MOST - len(fresh)])
            self._wake[r.name].set()

    async def run(self, stop: asyncio.Event) -> None:
        if not self.receivers:
            return
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)  # per attempt, all of it
        async with aiohttp.ClientSession(timeout=timeout) as http, asyncio.TaskGroup() as tg:
            for r in self.receivers:
                tg.create_task(self._loop(r, http, stop), name=f"webhook-{r.name}")

    async def _loop(self, r: WebhookReceiver, http: aiohttp.ClientSession,
                    stop: asyncio.Event) -> None:
        # Results are recorded by a flush of their own, many rows a transaction: on
        # SQLite each transaction waits for the one write lock, behind the hot path, and
        # waiting for it between posts let alerts queue. Rows posted and not yet recorded
        # are skipped by `_due`; a crash before the record resends them, same webhook-id.
        wake = self._wake[r.name]
        fresh = self._fresh[r.name]
        posted: dict[str, tuple[_Due, str | None]] = {}  # by alert_id
        # Recorded by a flush; forgotten here, between two reads of due rows: forgotten
        # by the flush, one read before its commit and returned after it was sent again.
        recorded: set[str] = set()

        def forget() -> None:
            for alert_id in recorded:
                posted.pop(alert_id, None)
            recorded.clear()

        # The last FRESH_MOST alerts posted: a fresh one may have been read back,
        # posted and forgotten before its turn came (a slow receiver, many due rows).
        sent: dict[str, None] = {}

        flushing: asyncio.Future[None] | None = None
        read_ms = 0  # when due rows were last read
        try:
            while not stop.is_set():
                wake.clear()
                forget()
                stopping = asyncio.ensure_future(stop.wait())
                behind = False
                try:
                    due = [row for row in fresh if row.alert_id not in sent]
                    fresh.clear()
                    # Retries and what others raised come by the query: at least every
                    # POLL_S while fresh alerts keep coming.
                    if not due or self.clock() - read_ms >= POLL_S * 1000:
                        read_ms = self.clock()
                        # Rows posted and not yet recorded come back too: read past them.
                        rows = await self._due(r, BATCH + len(posted))
                        behind = len(rows) >= BATCH + len(posted)
                        due += rows
                    for row in due:
                        if row.alert_id in posted:  # fresh, and read back meanwhile
                            continue
                        post = asyncio.ensure_future(self._post(r, http, row))
                        await asyncio.wait({post, stopping},
                                           return_when=asyncio.FIRST_COMPLETED)
                        if not post.done():  # shutting down: the row stays pending
                            post.cancel()
                            break
                        posted[row.alert_id] = (row, post.result())
                        sent[row.alert_id] = None
                        if len(sent) > FRESH_MOST:
                            del sent[next(iter(sent))]
                except DB_ERRORS as exc:  # the database is away: rows wait
                    log.warning("webhook %s: database error: %s", r.name, str(exc)[:200])
                finally:
                    stopping.cancel()
                forget()
                if posted and (flushing is None or flushing.done()):
                    flushing = asyncio.ensure_future(
                        self._flush_soon(r.name, posted, recorded, stop))
                if not behind and not fresh:  # caught up: sleep until new alerts or the poll
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(_first(wake, stop), POLL_S)
        finally:
            if flushing is not None:
                await flushing
            forget()
            await self._flush(r.name, posted, recorded)

    async def _flush_soon(self, name: str, posted: dict[str, tuple[_Due, str | None]],
                          recorded: set[str], stop: asyncio.Event) -> None:
        """As the outbox's marks: wait MARK_AFTER_S for company (less if `stop` is
        set), then record."""
        await pause(MARK_AFTER_S, stop)
        await self._flush(name, posted, recorded)

    async def _flush(self, name: str, posted: dict[str, tuple[_Due, str | None]],
                     recorded: set[str]) -> None:
        """Record what was posted, and note it in `recorded`, for the loop to forget;
        on a database error keep it for later."""
        batch = list(posted.values())
        try:
            await self._record(name, batch)
        except DB_ERRORS as exc:
            log.warning("webhook %s: results not recorded yet: %s", name, str(exc)[:200])
            return
        recorded.update(row.alert_id for row, _ in batch)

    async def _due(self, r: WebhookReceiver, limit: int) -> list[_Due]:
        q = _DUE_WITH_CONTACT if r.contact == "full" else _DUE
        async with reading(self.engine).connect() as conn:
            rows = (await conn.execute(q, {"p_channel": r.name, "p_now": self.clock(),
                                           "p_limit": limit})).all()
        out = []
        for row in rows:
            due = _Due(row.alert_id, row.kind, row.attempts, row.created_ms, row.payload)
            if r.contact == "full" and (row.name or row.phone):
                due = replace(due, payload=_with_contact(row.payload, row.name, row.phone),
                              contact_of=f"vehicle:{format_tag(from_db(row.tag))}")
            out.append(due)
        return out

    async def _post(self, r: WebhookReceiver, http: aiohttp.ClientSession, row: _Due,
                    ) -> str | None:
        """None when delivered, else what went wrong."""
        ts = self.clock() // 1000
        headers = {"content-type": "application/json", "webhook-id": row.alert_id,
                   "webhook-timestamp": str(ts),
                   "webhook-signature": sign(r, row.alert_id, ts, row.payload)}
        try:
            async with http.post(r.url, data=row.payload.encode(), headers=headers) as answer:
                await answer.read()  # the whole answer, so that the connection is kept
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"

    async def _record(self, name: str, done: list[tuple[_Due, str | None]]) -> None:
        if not done:
            return
        now = self.clock()
        rows, results = [], []
        for row, error in done:
            attempts = row.attempts + 1
            values = {"aid": row.alert_id, "ch": name, "attempts": attempts,
                      "error": error or "",
                      "delivered": None, "dead": None, "next": now}
            if error is None:
                values["delivered"], result = now, "delivered"
            elif now - row.created_ms >= self.max_age_ms:
                values["dead"], result = now, "dead"
                log.warning("webhook %s: alert %s dead-lettered after %d attempts: %s", name,
                            row.alert_id, attempts, error)
            else:
                values["next"], result = now + retry_delay_ms(attempts, self._rng), "failed"
            rows.append(values)
            results.append((row.kind, result))
        async with self.turn, self.engine.begin() as conn:
            await conn.execute(_RECORD, rows)
            for row, _ in done:  # every attempt sent the owner whole: each is a read
                if row.contact_of:
                    await audit(conn, Principal(f"webhook:{name}", "police"),
                                [row.contact_of], now, f"alert {row.alert_id}")
        for kind, result in results:
            self.on_result(name, kind, result)


async def _first(wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Return when either event is set."""
    waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
