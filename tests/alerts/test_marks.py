"""Alerts leave as soon as they are committed; deliveries are recorded many to a
transaction, and what waits to be recorded holds back no other alert: the outbox's
MQTT marks and the webhook sender's results, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

import alerts.outbox
import alerts.webhook
from alerts.engine import RaisedAlert
from alerts.ids import new_ulid
from alerts.outbox import PUBLISH_BATCH, Outbox
from alerts.webhook import BATCH, WebhookSender
from ingest.clock import wall_ms
from ingest.config import WebhookReceiver
from registry.models import Alert, Delivery
from tests.alerts.test_webhook import SECRET_NEW, Receiver
from tests.helpers import until


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


async def _pending(engine: AsyncEngine, n: int, channel: str | None = None) -> list[RaisedAlert]:
    """`n` alerts raised and not delivered yet (and owed to webhook `channel`)."""
    now = wall_ms()
    rows = [{"alert_id": new_ulid(now), "kind": "stolen_sighting", "case_id": f"C-{i}",
             "tag": i + 1, "station": "SP-0001", "zone": "north", "visit_first_ms": now,
             "update_no": 1, "raised_ms": now, "received_ms": now,
             "payload": f'{{"n": {i}}}'} for i in range(n)]
    async with engine.begin() as conn:
        await conn.execute(insert(Alert), rows)
        if channel is not None:
            await conn.execute(insert(Delivery), [
                {"alert_id": r["alert_id"], "channel": channel, "created_ms": now,
                 "next_ms": now} for r in rows])
    return [RaisedAlert(str(r["alert_id"]), "north", str(r["payload"]).encode(), now)
            for r in rows]


async def _delivered(engine: AsyncEngine, at_least: int = 0, within_s: float = 0) -> int:
    """Deliveries recorded as delivered; with `within_s`, once `at_least` are (or the
    time is up)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        async with engine.connect() as conn:
            count = int((await conn.execute(select(func.count()).where(
                Delivery.delivered_ms.is_not(None)))).scalar_one())
        if count >= at_least or asyncio.get_running_loop().time() >= deadline:
            return count
        await asyncio.sleep(0.05)


def _count_commits(engine: AsyncEngine) -> list[int]:
    commits = [0]

    def on_commit(_conn: Any) -> None:
        commits[0] += 1

    event.listen(engine.sync_engine, "commit", on_commit)
    return commits


async def test_published_alerts_are_marked_together(engine: AsyncEngine,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts.outbox, "MARK_AFTER_S", 0.3)
    published: list[str] = []

    async def publish(topic: str, payload: bytes) -> int:
        published.append(topic)
        return wall_ms()

    outbox = Outbox(engine, "bw", publish, wall_ms, lambda _s: None, sweep_s=60)
    commits = _count_commits(engine)
    stop = asyncio.Event()
    task = asyncio.create_task(outbox.run(stop))
    await asyncio.sleep(0.2)  # its first sweep found nothing
    raised = await _pending(engine, 30)
    commits[0] = 0
    for alert in raised:  # one at a time, as groups commit them
        outbox.notify([alert])
        await asyncio.sleep(0.005)
    assert await until(lambda: len(published) == 30, 5)

    async def marked() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).where(
                Alert.published_ms.is_not(None)))).scalar_one())

    deadline = asyncio.get_running_loop().time() + 5
    while await marked() < 30 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert await marked() == 30
    assert commits[0] <= 3  # a mark a publish made 30
    stop.set()
    await task
    assert published == ["bw/alerts/north"] * 30


async def test_posts_waiting_to_be_recorded_hold_back_no_other_alert(
        engine: AsyncEngine, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """More alerts than the sender reads at a time are posted, each once, while none of
    them is recorded yet; at shutdown all are recorded in one go."""
    monkeypatch.setattr(alerts.webhook, "MARK_AFTER_S", 60.0)  # nothing recorded meanwhile
    n = 2 * BATCH + 10
    raised = await _pending(engine, n, channel="police")
    sender = WebhookSender(engine, [WebhookReceiver("police", receiver.url, (SECRET_NEW,))],
                           wall_ms)
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    assert await until(lambda: len(receiver.delivered()) == n, 10)
    await asyncio.sleep(0.3)  # a second copy would have come by now
    ids = [h["webhook-id"] for h, _ in receiver.delivered()]
    assert sorted(ids) == sorted(a.alert_id for a in raised)
    assert await _delivered(engine) == 0
    stop.set()
    await asyncio.wait_for(task, 70)
    assert await _delivered(engine) == n


async def test_committed_alerts_are_published_before_the_loop_turns(
        engine: AsyncEngine) -> None:
    """`notify` publishes (up to PUBLISH_BATCH at once), the outbox's task waits for
    the PUBACKs and publishes the rest: each alert once."""
    loop = asyncio.get_running_loop()
    sent: list[bytes] = []

    def publish(topic: str, payload: bytes) -> asyncio.Future[int]:
        """As MqttLink.publish: sent by the call, acknowledged a moment later."""
        sent.append(payload)
        puback: asyncio.Future[int] = loop.create_future()
        loop.call_later(0.01, lambda: puback.set_result(wall_ms()))
        return puback

    outbox = Outbox(engine, "bw", publish, wall_ms, lambda _s: None, sweep_s=60)
    stop = asyncio.Event()
    task = asyncio.create_task(outbox.run(stop))
    await asyncio.sleep(0.2)  # its first sweep found nothing
    raised = await _pending(engine, PUBLISH_BATCH + 50)
    outbox.notify(raised)
    assert len(sent) == PUBLISH_BATCH  # no await since: sent by `notify` itself
    assert await until(lambda: len(sent) == len(raised), 5)
    await asyncio.sleep(0.2)  # a second copy would have gone by now
    stop.set()
    await task
    assert sorted(sent) == sorted(a.payload for a in raised)


async def test_an_alert_is_published_when_the_broker_acknowledges_it(
        engine: AsyncEngine) -> None:
    """The latency histogram, `on_published` and the mark take the PUBACK's time, as the
    publish gives it (the network thread reads the clock), not the time the outbox's task
    got to it: that task may wait behind the hot path for some ms."""
    acked: dict[str, int] = {}
    by_payload: dict[bytes, str] = {}

    async def publish(topic: str, payload: bytes) -> int:
        await asyncio.sleep(0.05)  # the loop learns of the PUBACK later than it came
        return acked[by_payload[payload]]

    latencies: list[float] = []
    published: list[tuple[str, int]] = []
    outbox = Outbox(engine, "bw", publish, wall_ms, latencies.append, sweep_s=60)
    outbox.on_published = lambda a, at: published.append((a.alert_id, at))
    stop = asyncio.Event()
    task = asyncio.create_task(outbox.run(stop))
    await asyncio.sleep(0.2)  # its first sweep found nothing
    raised = await _pending(engine, 3)
    acked.update({a.alert_id: a.received_ms + 7 + i for i, a in enumerate(raised)})
    by_payload.update({a.payload: a.alert_id for a in raised})
    outbox.notify(raised)
    assert await until(lambda: len(published) == 3, 5)
    stop.set()
    await task
    assert sorted(published) == sorted(acked.items())
    assert sorted(latencies) == [0.007, 0.008, 0.009]
    async with engine.connect() as conn:
        marks = dict((await conn.execute(select(Alert.alert_id, Alert.published_ms))).all())
    assert marks == acked


async def test_committed_alerts_are_posted_without_reading_them_back(
        engine: AsyncEngine, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """`notify` hands the webhook loop the alerts just committed: posted without the
    query for due rows, and recorded by their alert and webhook."""
    monkeypatch.setattr(alerts.webhook, "POLL_S", 30.0)
    monkeypatch.setattr(alerts.webhook, "MARK_AFTER_S", 0.05)
    sender = WebhookSender(engine, [WebhookReceiver("police", receiver.url, (SECRET_NEW,)),
                                    WebhookReceiver("south", receiver.url, (SECRET_NEW,),
                                                    zones=("south",))], wall_ms)
    reads = [0]
    due = sender._due

    async def counted(*args: Any) -> Any:
        reads[0] += 1
        return await due(*args)

    sender._due = counted  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    assert await until(lambda: reads[0] == 2)  # each loop's first look: nothing due
    raised = await _pending(engine, 3, channel="police")
    sender.notify(raised)
    assert await until(lambda: len(receiver.delivered()) == 3, 5)
    assert reads[0] == 2
    assert sorted(h["webhook-id"] for h, _ in receiver.delivered()) == sorted(
        a.alert_id for a in raised)  # and none to the other zone's webhook
    assert await _delivered(engine, 3, within_s=5) == 3
    stop.set()
    await task


async def test_an_alert_read_back_and_posted_is_not_posted_again_when_notified(
        engine: AsyncEngine, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow loop may read an alert back, post it and record it before the alert's
    notice comes: the notice then posts nothing."""
    monkeypatch.setattr(alerts.webhook, "POLL_S", 30.0)
    monkeypatch.setattr(alerts.webhook, "MARK_AFTER_S", 0.05)
    raised = await _pending(engine, 1, channel="police")
    sender = WebhookSender(engine, [WebhookReceiver("police", receiver.url, (SECRET_NEW,))],
                           wall_ms)
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    assert await until(lambda: len(receiver.delivered()) == 1, 5)
    await _delivered(engine, 1, within_s=5)
    sender.notify(raised)
    await asyncio.sleep(0.5)
    stop.set()
    await task
    assert len(receiver.requests) == 1
