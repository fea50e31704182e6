"""The live alert stream for browsers: Server-Sent Events, resumable with `Last-Event-ID`.

Every alert is an event `id: <alert_id>`, `event: alert`, `data: <alert JSON>`.
A client that reconnects with the last id it saw gets everything raised since,
read from the alerts table, then the live ones; so does any client, whichever
worker raised the alert. There are no per-client queues to grow: each
connection reads the table after its last alert when this worker commits an
alert (`notify`) and at least every second (for other workers'), and slow
clients simply read later. Alerts are ordered by the time they were raised;
because two transactions may commit out of that order, each read looks back
`SLACK_MS` and skips what it already sent, and a resumed stream may repeat an
alert or two from just before its `Last-Event-ID`, which clients drop by id
as every alert receiver does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.db import reading
from registry.models import Alert

SLACK_MS = 5_000
POLL_S = 1.0
KEEPALIVE_S = 15.0
BATCH = 200


class AlertStream:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """Alerts were committed: wake every connection."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _start_ms(self, last_event_id: str | None) -> int:
        if not last_event_id:
            return -1  # a new client: live alerts only
        async with reading(self.engine).connect() as conn:
            raised = (await conn.execute(select(Alert.raised_ms)
                                         .where(Alert.alert_id == last_event_id))).scalar()
        return 0 if raised is None else int(raised)  # unknown id: everything kept

    async def events(self, last_event_id: str | None, zones: Collection[str],
                     stop: asyncio.Event, now_ms: int) -> AsyncIterator[bytes]:
        """The SSE byte stream, until `stop` is set or the client goes away."""
        since = await self._start_ms(last_event_id)
        if since < 0:
            since = now_ms
        sent: OrderedDict[str, int] = OrderedDict()
        if last_event_id:
            sent[last_event_id] = since
        yield b"retry: 2000\n\n"
        idle = 0.0
        while not stop.is_set():
            changed = self._changed
            q = (select(Alert.alert_id, Alert.raised_ms, Alert.payload)
                 .where(Alert.raised_ms >= since - SLACK_MS, Alert.payload != "")
                 .order_by(Alert.raised_ms, Alert.alert_id).limit(BATCH + len(sent)))
            if zones:
                q = q.where(Alert.zone.in_(list(zones)))
            async with reading(self.engine).connect() as conn:
                rows = (await conn.execute(q)).all()
            fresh = [r for r in rows if r.alert_id not in sent]
            for r in fresh:
                yield f"id: {r.alert_id}\nevent: alert\ndata: {r.payload}\n\n".encode()
                sent[r.alert_id] = r.raised_ms
                since = max(since, r.raised_ms)
            while sent and next(iter(sent.values())) < since - SLACK_MS:
                sent.popitem(last=False)
            if len(fresh) >= BATCH:
                continue  # catching up: no waiting
            waited = asyncio.ensure_future(changed.wait())
            stopping = asyncio.ensure_future(stop.wait())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.wait({waited, stopping},
                                                    return_when=asyncio.FIRST_COMPLETED),
                                       POLL_S)
            waited.cancel()
            stopping.cancel()
            idle = 0.0 if fresh else idle + POLL_S
            if idle >= KEEPALIVE_S:  # a comment line keeps proxies from closing the stream
                idle = 0.0
                yield b": keepalive\n\n"
