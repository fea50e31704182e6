"""The express lane (Pipeline.split, Worker._watch): the stations that heard a stolen tag
go first, as a group of their own or at the end of the take being stored, and what is
stored comes out as if the group had been one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from ingest.broker import BrokerHandle
from ingest.clock import wall_ms
from ingest.codec import encode_binary, encode_json
from ingest.mqtt import Inbox, MqttLink
from ingest.pipeline import EXPRESS_MIN_REST, PART_MOST, PULL_MOST, Inbound
from ingest.service import Worker
from ingest.visitlog import drain
from registry.db import open_database
from registry.models import Alert, Visit
from tests.helpers import STOLEN, settings_for, stage_registry

THEFT_SEEN = "SP-0040"


@pytest.fixture
async def worker(broker: BrokerHandle, tmp_path: Path) -> AsyncIterator[Worker]:
    w = await _worker(broker, f"sqlite+aiosqlite:///{tmp_path}/express.db")
    yield w
    await w.engine.dispose()


async def _worker(broker: BrokerHandle, url: str) -> Worker:
    """A worker's pipeline on the staged town, with the theft loaded; not consuming."""
    await stage_registry(url)
    w = Worker(settings_for(broker, url), await open_database(url))
    await w._refresh()
    assert len(w.holder.current) == 1
    return w


class Traffic:
    """Messages as the reads connection hands them over."""

    def __init__(self, root: str, seq0: int = 0) -> None:
        self.root = root
        self.seq0 = seq0
        self.msgs: list[Inbound] = []
        self.now = wall_ms()

    def batch(self, station: str, tags: list[int], json: bool = False) -> Inbound:
        seq = self.seq0 + len(self.msgs)
        payload = (encode_json(7, seq, self.now, tags, [self.now + seq] * len(tags)) if json
                   else encode_binary(7, seq, self.now, tags, [seq] * len(tags)))
        m = Inbound(f"{self.root}/stations/{station}/reads", payload, seq + 1, 1,
                    self.now + seq)
        self.msgs.append(m)
        return m

    def crowd(self, n: int) -> None:
        """`n` batches from stations where nothing is stolen, bikes heard again and again."""
        for _ in range(n):
            i = len(self.msgs)
            self.batch(f"X-{i % 23}", [1000 + i % 7, 2000 + i % 5, 3000 + i])


def _town(w: Worker, seq0: int = 0) -> Traffic:
    return Traffic(w.settings.mqtt_root, seq0)


async def test_the_stations_that_heard_a_stolen_tag_go_first(worker: Worker) -> None:
    t = _town(worker)
    t.crowd(10)
    before = t.batch(THEFT_SEEN, [5, 6])
    t.crowd(30)
    sighting = t.batch(THEFT_SEEN, [5, STOLEN, 6])
    t.crowd(20)
    (first, rest), pulled = worker.pipeline.split(t.msgs)
    assert first == [before, sighting]  # the station's batches, in order
    assert rest == [m for m in t.msgs if m not in first] and pulled == []


async def test_one_group_where_the_lane_would_not_pay(worker: Worker) -> None:
    t = _town(worker)
    t.crowd(EXPRESS_MIN_REST - 1)
    t.batch(THEFT_SEEN, [STOLEN])
    assert worker.pipeline.split(t.msgs) == ([t.msgs], [])  # the rest is quick anyway
    t.crowd(1)
    assert len(worker.pipeline.split(t.msgs)[0]) == 2
    quiet = _town(worker)
    quiet.crowd(80)
    assert worker.pipeline.split(quiet.msgs) == ([quiet.msgs], [])  # nothing stolen heard
    text = _town(worker)
    text.crowd(40)
    text.batch(THEFT_SEEN, [STOLEN], json=True)
    text.crowd(40)
    assert worker.pipeline.split(text.msgs) == ([text.msgs], [])  # JSON keeps the pace


class _Acks:
    """Stands in for the MQTT link where only its acknowledgements are looked at."""

    def __init__(self) -> None:
        self.acked: list[list[Inbound]] = []

    def ack(self, msgs: list[Inbound]) -> None:
        self.acked.append(list(msgs))


def _inbox(msgs: list[Inbound]) -> Inbox:
    """An inbox holding `msgs`, as the network thread would have left it."""
    inbox = Inbox(asyncio.get_running_loop(), 10_000)
    for m in msgs:
        inbox.put_threadsafe(m)
    return inbox


def _alerts_sent(w: Worker) -> list[int]:
    """The received time of every alert the worker delivers from now on."""
    sent: list[int] = []
    w._deliver = lambda alerts: sent.extend(a.received_ms for a in alerts)  # type: ignore[method-assign]
    return sent


async def test_acknowledged_together_in_the_order_received(worker: Worker) -> None:
    """The sighting is committed and its alert sent first, yet PUBACKs keep the order
    the messages came in (MQTT section 4.6), after both groups are committed."""
    t = _town(worker)
    t.crowd(20)
    t.batch(THEFT_SEEN, [STOLEN])
    t.crowd(40)
    sent = _alerts_sent(worker)
    acks = _Acks()
    inbox = _inbox(t.msgs)
    await worker._groups(await inbox.take(len(t.msgs)), cast(MqttLink, acks), inbox)
    assert acks.acked == [t.msgs]
    assert sent == [t.msgs[20].received_ms]


async def test_a_sighting_in_the_backlog_goes_first_and_is_acknowledged_in_turn(
        worker: Worker) -> None:
    """A sighting still in the inbox, behind the take, is stored with the take's first
    transaction, with its station's earlier messages; stand-ins hold their places, and
    are acknowledged in their turn, not stored again."""
    t = _town(worker)
    t.crowd(40)                    # 0-39: the take
    t.batch(THEFT_SEEN, [5])       # 40: the theft station, before the sighting
    t.crowd(10)                    # 41-50
    t.batch(THEFT_SEEN, [STOLEN])  # 51: the sighting
    t.batch(THEFT_SEEN, [6])       # 52: after it: stays in its turn
    t.crowd(10)                    # 53-62
    sent = _alerts_sent(worker)
    acks = _Acks()
    inbox = _inbox(t.msgs)
    await worker._groups(await inbox.take(40), cast(MqttLink, acks), inbox)
    assert sent == [t.msgs[51].received_ms]  # alerted with the take before its own
    assert acks.acked == [t.msgs[:40]]
    behind = await inbox.take(100)
    assert [m.stored for m in behind] == [i in (40, 51) for i in range(40, 63)]
    assert [replace(m, stored=False) for m in behind] == t.msgs[40:]
    await worker._groups(behind, cast(MqttLink, acks), inbox)
    assert acks.acked[1] == behind and len(sent) == 1
    assert worker.registry.get_sample_value("bikewatch_duplicate_batches_total") == 0
    assert worker.registry.get_sample_value("bikewatch_batches_total") == len(t.msgs)
    visits, _ = await _stored(worker)
    assert {v[0] for v in visits if v[1] == THEFT_SEEN} == {5, STOLEN, 6}


async def test_a_sighting_pulled_into_a_take_of_one_group_is_stored_with_it(
        worker: Worker) -> None:
    """Where the rest is too short for a group of its own, the take is one group, and a
    sighting from the backlog is stored in it (a stand-in holds its place)."""
    t = _town(worker)
    t.crowd(EXPRESS_MIN_REST - 2)
    for _ in range(10):
        t.batch(THEFT_SEEN, [5])
    t.batch(THEFT_SEEN, [STOLEN])         # the take's sighting: its station, 11 messages
    t.now += 120_000
    backlog = t.batch("SP-0042", [STOLEN])  # in the backlog, at the next station
    inbox = _inbox(t.msgs)
    sent = _alerts_sent(worker)
    take = await inbox.take(len(t.msgs) - 1)
    await worker._groups(take, cast(MqttLink, _Acks()), inbox)
    assert sent == [take[-1].received_ms, backlog.received_ms]
    assert [m.stored for m in await inbox.take(10)] == [True]


async def _stored(w: Worker) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    await drain(w.engine)
    async with w.engine.connect() as conn:
        visits = (await conn.execute(select(
            Visit.tag, Visit.station, Visit.first_ms, Visit.last_ms, Visit.reads,
            Visit.best_rssi).order_by(Visit.tag, Visit.station, Visit.first_ms))).all()
        alerts = (await conn.execute(select(
            Alert.kind, Alert.case_id, Alert.station, Alert.visit_first_ms, Alert.update_no)
            .order_by(Alert.visit_first_ms))).all()
    return [tuple(v) for v in visits], [tuple(a) for a in alerts]


async def test_split_stores_what_one_group_stores(broker: BrokerHandle, tmp_path: Path) -> None:
    whole = await _worker(broker, f"sqlite+aiosqlite:///{tmp_path}/whole.db")
    split = await _worker(broker, f"sqlite+aiosqlite:///{tmp_path}/split.db")
    rng = np.random.default_rng(7)
    takes: list[list[Inbound]] = []
    for _ in range(3):  # three takes, the stolen bike at the theft station in each
        t = _town(whole, 1000 * len(takes))
        for i in range(90):
            if i in (20, 21, 60):
                t.batch(THEFT_SEEN, [STOLEN, int(rng.integers(1, 50))])
            else:
                t.crowd(1)
        takes.append(t.msgs)
    try:
        for msgs in takes:
            assert (await whole.pipeline.process(msgs)).reads == sum(
                int.from_bytes(m.payload[20:24], "little") for m in msgs)
            retopic = [Inbound(m.topic.replace(whole.settings.mqtt_root,
                                               split.settings.mqtt_root), m.payload, m.mid,
                               m.qos, m.received_ms) for m in msgs]
            groups, _ = split.pipeline.split(retopic)
            assert len(groups) == 2 and len(groups[0]) == 3
            for group in groups:
                await split.pipeline.process(group)
        assert await _stored(split) == await _stored(whole)
        _, alerts = await _stored(split)
        assert len(alerts) >= 1
    finally:
        await whole.engine.dispose()
        await split.engine.dispose()


async def test_the_stations_earlier_messages_come_along_even_when_looked_at_before(
        worker: Worker) -> None:
    """A station's messages before its sighting go with it, those that an earlier take
    looked into (and found nothing) too: otherwise they would fold after newer reads."""
    t = _town(worker)
    t.crowd(80)                   # 0-79: two takes of 40
    t.crowd(20)                   # 80-99
    earlier = t.batch(THEFT_SEEN, [5])  # 100: looked at with the first take, no sighting
    t.crowd(40)                   # 101-140
    inbox = _inbox(t.msgs)
    sent = _alerts_sent(worker)
    acks = _Acks()
    await worker._groups(await inbox.take(40), cast(MqttLink, acks), inbox)
    t.batch(THEFT_SEEN, [STOLEN, 5])    # 141: arrives while the first take is stored
    inbox.put_threadsafe(t.msgs[-1])
    await worker._groups(await inbox.take(40), cast(MqttLink, acks), inbox)
    assert sent == [t.msgs[141].received_ms]
    rest = await inbox.take(200)
    assert [m.received_ms for m in rest if m.stored] == [earlier.received_ms,
                                                          t.msgs[141].received_ms]


async def test_a_deep_backlog_keeps_its_order(worker: Worker) -> None:
    """A sighting with more than PULL_MOST of its station's messages before it waits for
    its turn."""
    t = _town(worker)
    t.crowd(40)
    for _ in range(PULL_MOST):
        t.batch(THEFT_SEEN, [5])
    t.batch(THEFT_SEEN, [STOLEN])
    inbox = _inbox(t.msgs)
    sent = _alerts_sent(worker)
    await worker._groups(await inbox.take(40), cast(MqttLink, _Acks()), inbox)
    assert sent == []
    assert not any(m.stored for m in await inbox.take(1000))


async def test_a_sighting_that_comes_during_a_take_is_written_at_its_end(
        worker: Worker) -> None:
    """While a take is stored, a sighting that arrives is pulled from the inbox (its
    stand-in left), written in the take's last transaction after the take's own
    messages of its station, and acknowledged in its turn."""
    t = _town(worker)
    t.crowd(20)
    t.batch(THEFT_SEEN, [5])       # 20: the station, in the take
    t.crowd(20)
    inbox = _inbox(t.msgs)
    take = await inbox.take(len(t.msgs))
    sent = _alerts_sent(worker)
    acks = _Acks()
    sighting = t.batch(THEFT_SEEN, [STOLEN, 5])
    await _held_while_waiting(worker, inbox, worker._groups(take, cast(MqttLink, acks), inbox),
                              sighting, t.batch("SP-0042", [6]))
    assert sent == [sighting.received_ms] and acks.acked == [take]
    behind = await inbox.take(10)
    assert [m.stored for m in behind] == [True, False]
    await worker._groups(behind, cast(MqttLink, acks), inbox)
    assert acks.acked[1] == behind and len(sent) == 1
    assert worker.registry.get_sample_value("bikewatch_duplicate_batches_total") == 0
    assert worker.registry.get_sample_value("bikewatch_batches_total") == len(t.msgs)
    visits, _ = await _stored(worker)
    at_station = [v for v in visits if v[1] == THEFT_SEEN and v[0] == 5]
    assert len(at_station) == 1 and at_station[0][4] == 2  # one visit: folded in order


async def test_no_sighting_is_held_while_no_take_is_stored(worker: Worker) -> None:
    """The consumer takes it at once then, and `split` looks into it; the watcher looks
    into it once a take is being stored, if it is still in the inbox."""
    t = _town(worker)
    inbox = _inbox([])
    watch = asyncio.create_task(worker._watch(inbox))
    try:
        inbox.put_threadsafe(t.batch(THEFT_SEEN, [STOLEN]))
        await _turns()
        assert not worker.pipeline.holding
        worker._storing = True
        inbox.put_threadsafe(t.batch("SP-0042", [6]))
        await _turns()
        assert worker.pipeline.holding
    finally:
        watch.cancel()
    assert [m.stored for m in await inbox.take(10)] == [True, False]


async def test_a_stand_in_is_not_pulled_again(worker: Worker) -> None:
    """Two sightings at one station, each pulled while held ones wait: the second pull
    leaves the first's stand-in where it is, or its reads would be stored twice."""
    t = _town(worker)
    inbox = _inbox([])
    worker._storing = True
    watch = asyncio.create_task(worker._watch(inbox))
    try:
        for tags in ([STOLEN], [STOLEN, 5]):
            inbox.put_threadsafe(t.batch(THEFT_SEEN, tags))
            await _turns()
    finally:
        watch.cancel()
    assert [len(d.batches) for d in worker.pipeline._held] == [1, 1]
    result = await worker.pipeline.store(worker.pipeline.decode([]), held=True)
    assert (result.batches, result.reads, result.duplicates) == (2, 3, 0)


async def test_held_sightings_are_held_again_when_the_transaction_fails(
        worker: Worker) -> None:
    t = _town(worker)
    t.crowd(3)
    sighting = t.batch(THEFT_SEEN, [STOLEN])
    worker.pipeline.hold([sighting])
    reads, failed = worker.pipeline._reads, list[bool]()

    def fail_once(*args: Any) -> None:
        reads(*args)
        if not failed:
            failed.append(True)
            raise OperationalError("COMMIT", {}, Exception("database is locked"))

    worker.pipeline._reads = fail_once  # type: ignore[method-assign,assignment]
    decoded = worker.pipeline.decode(t.msgs[:3])
    with pytest.raises(OperationalError):
        await worker.pipeline.store(decoded, held=True)
    assert worker.pipeline.holding
    result = await worker.pipeline.store(decoded, held=True)
    assert not worker.pipeline.holding
    assert (result.parts, result.batches, len(result.alerts)) == (1, 4, 1)
    assert result.alerts[0].received_ms == sighting.received_ms


async def test_a_held_sighting_ends_the_transaction_after_the_part_in_hand(
        worker: Worker) -> None:
    """A take is one transaction, in parts (Pipeline.parts), until a sighting is held:
    then it ends, with the sighting, after the part being written."""
    t = _town(worker)
    t.crowd(3 * PART_MOST)
    cut = worker.pipeline.parts(t.msgs)
    assert [len(p) for p in cut] == [PART_MOST] * 3 and [m for p in cut for m in p] == t.msgs
    parts = [worker.pipeline.decode(p) for p in cut]
    sighting = worker.pipeline.decode([t.batch(THEFT_SEEN, [STOLEN])])
    reads, came = worker.pipeline._reads, list[bool]()

    def arrives(*args: Any) -> None:
        reads(*args)
        if not came:  # during the first part
            came.append(True)
            worker.pipeline._held.append(sighting)

    worker.pipeline._reads = arrives  # type: ignore[method-assign,assignment]
    first = await worker.pipeline.store(*parts, held=True)
    assert (first.parts, first.batches, len(first.alerts)) == (1, PART_MOST + 1, 1)
    rest = await worker.pipeline.store(*parts[1:], held=True)
    assert (rest.parts, rest.batches, rest.alerts) == (2, 2 * PART_MOST, [])
    assert [len(p) for p in worker.pipeline.parts(t.msgs[:PART_MOST + 1])] == [
        PART_MOST // 2 + 1, PART_MOST // 2]  # as even as can be
    assert worker.pipeline.parts([]) == [[]]


async def test_only_a_group_without_stolen_tags_is_cut(worker: Worker) -> None:
    """A held sighting goes before its station's messages in the parts after the one in
    hand: a group where a stolen tag is, or may be (JSON, not looked into), is one
    part, so that a stolen tag's reads are never folded out of order."""
    t = _town(worker)
    t.crowd(2 * PART_MOST)
    assert len(worker.pipeline.parts(t.msgs)) == 2
    for tags, json in (([STOLEN], False), ([5], True)):
        mixed = _town(worker)
        mixed.crowd(PART_MOST)
        mixed.batch(THEFT_SEEN, tags, json=json)
        mixed.crowd(PART_MOST)
        assert worker.pipeline.parts(mixed.msgs) == [mixed.msgs]
    status = Inbound(f"{worker.settings.mqtt_root}/stations/X-1/status", b"online", 1, 1,
                     t.now)
    assert len(worker.pipeline.parts([*t.msgs, status])) == 3  # not a read: no matter


async def _held_while_waiting(worker: Worker, inbox: Inbox,
                              storing: Coroutine[Any, Any, None], *arrivals: Inbound) -> None:
    """Run `storing` (a take being stored) while it waits for the write turn, `arrivals`
    coming meanwhile: the watcher holds the sighting among them."""
    watch = asyncio.create_task(worker._watch(inbox))
    try:
        await worker._turn.acquire()
        worker._storing = True
        task = asyncio.create_task(storing)
        await _turns(20)  # decoded, part by part, and waiting for the turn
        for m in arrivals:
            inbox.put_threadsafe(m)
        await _turns()
        assert worker.pipeline.holding
        worker._turn.release()
        await task
    finally:
        watch.cancel()


async def _turns(n: int = 5) -> None:
    """Let the event loop run what is ready (the watcher's wake-ups)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_sighting_held_before_a_cut_take_is_written_goes_ahead_of_it(
        worker: Worker) -> None:
    """A take cut into parts holds no stolen tag: a sighting held while it waits for the
    write turn is committed first, in a transaction of its own, and the parts after."""
    t = _town(worker)
    t.crowd(3 * PART_MOST)
    inbox = _inbox(t.msgs)
    take = await inbox.take(len(t.msgs))
    sent = _alerts_sent(worker)
    stored, store = list[tuple[int, int, int]](), worker.pipeline.store

    async def noted(*parts: Any, held: bool = False) -> Any:
        result = await store(*parts, held=held)
        stored.append((result.parts, result.batches, len(result.alerts)))
        return result

    worker.pipeline.store = noted  # type: ignore[method-assign]
    sighting = t.batch(THEFT_SEEN, [STOLEN, 5])
    await _held_while_waiting(
        worker, inbox, worker._groups(take, cast(MqttLink, _Acks()), inbox), sighting)
    assert stored == [(0, 1, 1), (3, 3 * PART_MOST, 0)]
    assert sent == [sighting.received_ms]


async def test_a_group_that_may_hold_a_stolen_tag_writes_a_held_sighting_after_it(
        worker: Worker) -> None:
    """Not cut, a group may hold the stolen bike's older reads: the sighting held
    meanwhile goes after it, so that the bike's reads fold in order."""
    t = _town(worker)
    t.crowd(10)
    older = t.batch("SP-0042", [STOLEN])
    inbox = _inbox(t.msgs)
    take = await inbox.take(len(t.msgs))
    sent = _alerts_sent(worker)
    sighting = t.batch(THEFT_SEEN, [STOLEN])
    await _held_while_waiting(worker, inbox, worker._group([take]), sighting)
    # The bike's alerts in the order it was heard (at the second station, a
    # millisecond later, it also raises impossible travel).
    assert sent[0] == older.received_ms and set(sent[1:]) == {sighting.received_ms}
    assert worker.registry.get_sample_value("bikewatch_batches_total") == 12


async def test_sightings_held_while_held_ones_are_written_wait_for_the_next_transaction(
        worker: Worker) -> None:
    """A run of sightings does not keep the first one's commit waiting: those held while
    the held ones are written go in the next transaction."""
    t = _town(worker, seq0=100)
    first = worker.pipeline.decode([t.batch(THEFT_SEEN, [STOLEN])])
    second = worker.pipeline.decode([t.batch(THEFT_SEEN, [STOLEN, 5])])
    worker.pipeline._held.append(first)
    reads, came = worker.pipeline._reads, list[bool]()

    def arrives(*args: Any) -> None:
        reads(*args)
        if not came:  # while the first is written
            came.append(True)
            worker.pipeline._held.append(second)

    worker.pipeline._reads = arrives  # type: ignore[method-assign,assignment]
    one = await worker.pipeline.store(held=True)
    assert (one.parts, one.batches, [a.received_ms for a in one.alerts]) == (
        0, 1, [t.msgs[0].received_ms])
    assert worker.pipeline.holding
    two = await worker.pipeline.store(held=True)
    assert (two.batches, len(two.alerts)) == (1, 0)  # the same visit: no new alert
    assert not worker.pipeline.holding
