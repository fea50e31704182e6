"""`bikewatch bench`: the figures of the core issue, all measured in one run.

Each figure is printed beside the baseline measured in the same run (the
machines are shared and noisy): matching against a Python set, the worker
against a bare subscriber of the same client library on the same broker.
The publisher runs in its own process (`python -m simulator.bench publish`),
on 127.0.0.1 only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import json
import multiprocessing
import os
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from ingest import eventloop
from ingest.broker import DEMO_USER, BrokerAddress, free_port, start_broker
from ingest.clock import wall_ms
from ingest.codec import HEADER, RECORD, decode, decode_many, encode_binary, encode_json
from ingest.config import Settings
from ingest.mqtt import ReadsClient
from ingest.visits import VisitTracker
from registry.snapshot import StolenSet
from registry.tags import format_tag
from simulator.bench_forecast import bench_forecast
from simulator.bench_health import bench_health
from simulator.bench_registry import bench_registry
from simulator.bench_workers import bench_workers
from simulator.loadgen import LoadGen
from simulator.report import Report

if TYPE_CHECKING:
    from alerts.engine import RaisedAlert
    from ingest.service import Worker

READS_PER_BATCH = 50
STATIONS = 200
BIKES_IN_RANGE = 10   # distinct tags in one batch, each heard READS_PER_BATCH / 10 times
VISIT_BATCHES = 10    # batches of one station before the bikes in range change
EPOCHS = 32
STOLEN_TAG = 0xDEAD0001  # and the next OPEN_CASES - 1 tags; the traffic's are random
TAG = struct.Struct("<Q")  # a binary record's first field
OPEN_CASES = 1_000  # in the latency run
SOAK_SAMPLE_S = 60.0


def _ns_per(fn: Callable[[], object], reads: int, min_s: float = 0.3) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s:
        fn()
        n += 1
    return elapsed / n / reads * 1e9


def _set_match(tags: np.ndarray, stolen: set[int]) -> list[int]:
    """The baseline: a Python set, one membership test per read."""
    return [i for i, t in enumerate(tags.tolist()) if t in stolen]


def bench_matching(quick: bool, report: Report) -> None:
    print("\n== hot-path matching, ns per read (lower is better) ==")
    print(f"{'stolen':>9} {'batch':>6} {'snapshot':>9} {'np.isin':>9} {'py set':>8} "
          f"{'set/snapshot':>13}")
    rng = np.random.default_rng(1)
    for n in (1_000, 100_000) if quick else (1_000, 100_000, 1_000_000):
        stolen = rng.integers(0, 2**63, n, dtype=np.uint64)
        snap = StolenSet.build(1, [(int(t), 0, "c") for t in stolen])
        pyset = set(stolen.tolist())
        for b in (100, 10_000):
            tags = rng.integers(0, 2**63, b, dtype=np.uint64)
            tags[: max(1, b // 1000)] = stolen[: max(1, b // 1000)]
            t_snap = _ns_per(partial(snap.match, tags), b)
            t_isin = _ns_per(partial(np.isin, tags, stolen), b, 0.1)
            t_set = _ns_per(partial(_set_match, tags, pyset), b)
            print(f"{n:>9,} {b:>6,} {t_snap:>9.1f} {t_isin:>9.1f} {t_set:>8.1f} "
                  f"{t_set / t_snap:>12.1f}x")
            report.add("matching", f"snapshot, {n:,} stolen, batch {b:,}", t_snap, "ns/read",
                       t_set, "a Python set")


def bench_decode(report: Report) -> None:
    print("\n== decode, ns per read: one payload a call, and a group of 100 as the worker does ==")
    print(f"{'reads/batch':>11} {'binary':>8} {'json':>8} {'binary x100':>12} {'json x100':>10}")
    rng = np.random.default_rng(2)
    now = wall_ms()
    for n in (10, 50, 1000):
        tags = rng.integers(0, 2**40, n, dtype=np.uint64)
        rssi = rng.integers(-90, -30, n)
        b = encode_binary(1, 1, now, tags, np.arange(n), rssi)
        j = encode_json(1, 1, now, tags.tolist(), (now + np.arange(n)).tolist(), rssi.tolist())
        t_bin = _ns_per(partial(decode, b, "S1", now), n)
        t_json = _ns_per(partial(decode, j, "S1", now), n)
        g_bin = _ns_per(partial(decode_many, [(b, "S1", now)] * 100), n * 100)
        g_json = _ns_per(partial(decode_many, [(j, "S1", now)] * 100), n * 100)
        print(f"{n:>11} {t_bin:>8.1f} {t_json:>8.1f} {g_bin:>12.1f} {g_json:>10.1f}")
        report.add("decode", f"binary, {n} reads a batch, groups of 100", g_bin, "ns/read",
                   g_json, "the same reads as JSON")


def _fold_ms(open_visits: int, rng: np.random.Generator, groups: int = 100) -> float:
    """Median ms to fold a group of 100 batches (5,000 reads of 1,000 bikes, 100 of them
    new in town) into a tracker holding `open_visits`, as a group's store does."""
    tracker = VisitTracker(60_000)
    town = rng.choice(2**40, open_visits, replace=False).astype(np.uint64) + 1
    tracker.fold(town, np.zeros(open_visits, np.int32), np.zeros(open_visits, np.int64),
                 np.zeros(open_visits, np.int8))
    tracker.prune(0)  # as the worker's upkeep leaves it
    times = []
    for g in range(groups):
        tags = np.repeat(np.concatenate([rng.choice(town, 900), 2**41 + rng.choice(
            2**40, 100).astype(np.uint64)]), READS_PER_BATCH // BIKES_IN_RANGE)
        station = rng.integers(0, STATIONS, len(tags)).astype(np.int32)
        tracker.saved()  # as `Pipeline.store` does: in-place writes are journalled
        start = time.perf_counter()
        tracker.fold(tags, station, np.full(len(tags), 1_000 + g, np.int64),
                     np.full(len(tags), -60, np.int8))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def bench_fold(quick: bool, report: Report) -> None:
    print("\n== fold into visits: a group of 100 batches, 100 of its bikes new in town, "
          "ms by open visits ==")
    rng = np.random.default_rng(3)
    small = _fold_ms(10_000, rng)
    print(f"{10_000:>11,} open visits: {small:.2f} ms")
    for n in (100_000,) if quick else (100_000, 1_000_000):
        ms = _fold_ms(n, rng)
        print(f"{n:>11,} open visits: {ms:.2f} ms ({ms / small:.2f} of 10,000)")
        report.add("fold", f"group of 100 batches, {n:,} open visits", ms, "ms", small,
                   "10,000 open visits")


# -- the publisher process ----------------------------------------------------

def publish_main(argv: list[str]) -> None:
    """Publish read batches as fast as allowed (or at --rate batches/s) for --seconds.

    Payloads are built from pre-made read blocks (only the header or the seq
    changes per message) so that the publisher costs little next to the
    subscriber it feeds; see simulator.loadgen.
    """
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int)
    p.add_argument("--root")
    p.add_argument("--seconds", type=float)
    p.add_argument("--rate", type=float, default=0)
    p.add_argument("--format", default="binary")
    p.add_argument("--stolen-every", type=int, default=0)
    p.add_argument("--stolen-tags", type=int, default=1)
    a = p.parse_args(argv)
    rng = np.random.default_rng(os.getpid())
    boot = int(time.time()) & 0xFFFFFFFF
    # Traffic as a street sees it: each batch holds BIKES_IN_RANGE bikes heard
    # several times each, and the bikes in range change every VISIT_BATCHES
    # batches of that station. Block k serves station k % STATIONS in epoch
    # k // STATIONS.
    blocks: list[bytes] = []
    stolen_blocks: list[bytes] = []
    for k in range(STATIONS * EPOCHS):
        tags = np.repeat(rng.integers(1, 2**40, BIKES_IN_RANGE, dtype=np.uint64),
                         READS_PER_BATCH // BIKES_IN_RANGE)
        for out, stolen in ((blocks, False), (stolen_blocks, True)):
            if stolen:
                tags = tags.copy()
                tags[0] = STOLEN_TAG
            if a.format == "binary":
                rec = np.zeros(READS_PER_BATCH, dtype=RECORD)
                rec["tag"], rec["rssi"], rec["ant"] = tags, -60 - k % 20, 1
                out.append(rec.tobytes())
            else:
                # ts_ms is filled in per message: "%d" is replaced below.
                out.append(b"[" + b",".join(
                    b'{"tag":"%s","ts_ms":%%d,"rssi":-61,"ant":1}' % format_tag(int(t)).encode()
                    for t in tags.tolist()) + b"]")
    topics = [f"{a.root}/stations/B-{i}/reads" for i in range(STATIONS)]
    every = a.stolen_every
    stolen_text = format_tag(STOLEN_TAG).encode()

    def make(i: int) -> tuple[str, bytes]:
        station = i % STATIONS
        seq = i // STATIONS  # each station numbers its own batches: no gaps (registry.gaps)
        epoch = (seq // VISIT_BATCHES) % EPOCHS
        if every and i % every == 0:
            # One stolen bike after another, each at a station now and then, as in a
            # town; one bike at every station in turn had a trajectory growing by 20
            # visits a second, and every alert reading and sending all of it.
            tag = STOLEN_TAG + (i // every) % a.stolen_tags
            block = stolen_blocks[epoch * STATIONS + station]
            block = (TAG.pack(tag) + block[TAG.size:] if a.format == "binary"
                     else block.replace(stolen_text, format_tag(tag).encode(), 1))
        else:
            block = blocks[epoch * STATIONS + station]
        now = wall_ms()
        if a.format == "binary":
            return topics[station], HEADER.pack(b"BW", 1, 0, boot, seq, now,
                                                READS_PER_BATCH) + block
        reads = block.replace(b"%d", str(now).encode())
        return topics[station], (b'{"v":1,"boot":%d,"seq":%d,"sent_ms":%d,"reads":'
                                 % (boot, seq, now) + reads + b"}")

    gen = LoadGen(a.port, f"benchpub-{uuid.uuid4().hex[:8]}")
    try:
        sent = gen.run(make, a.seconds, a.rate)
    finally:
        gen.close()
    print(sent, flush=True)


def _subscribe(client: paho.Client, port: int, topic: str) -> bool:
    """Connect a paho client as the bench's users do, subscribe (again on a reconnect)
    and run its network thread; True once the broker has granted the subscription."""
    ready = threading.Event()
    client.username_pw_set(DEMO_USER, DEMO_USER)
    client.on_subscribe = lambda *_: ready.set()
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return ready.wait(10)


# -- the police subscriber process ------------------------------------------

def police_main(argv: list[str]) -> None:
    """Subscribe to every zone's alerts as a police system would; print "ready" once
    subscribed and, when stdin closes, when each alert arrived (alert_id -> wall-clock
    ms) as one JSON object. A process of its own, so that its clock reads are not held
    up by the worker's interpreter."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int)
    p.add_argument("--root")
    a = p.parse_args(argv)
    arrived: dict[str, int] = {}
    subscription = f"{a.root}/alerts/#"
    # MQTT 3.1.1, which every broker speaks (amqtt refuses 5); alerts need nothing of 5
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"police-{uuid.uuid4().hex}")

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        # Only alerts count. amqtt 0.12 also hands a `#` subscriber retained messages of
        # other topics (a station's `online`); raising on one ended this network thread,
        # and amqtt then stalled on the dead connection, failing the tests after it.
        when = wall_ms()
        if paho.topic_matches_sub(subscription, msg.topic):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                arrived.setdefault(json.loads(msg.payload)["alert_id"], when)

    client.on_message = on_message
    if not _subscribe(client, a.port, subscription):
        raise SystemExit("police subscriber: not subscribed within 10 s")
    print("ready", flush=True)
    sys.stdin.read()  # until the bench closes it
    client.loop_stop()
    client.disconnect()
    print(json.dumps(arrived), flush=True)


def _start_publisher(broker: BrokerAddress, root: str, seconds: float, fmt: str = "binary",
                     rate: float = 0, stolen_every: int = 0,
                     stolen_tags: int = 1) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "simulator.bench", "publish", "--port", str(broker.port),
         "--root", root, "--seconds", str(seconds), "--format", fmt, "--rate", str(rate),
         "--stolen-every", str(stolen_every), "--stolen-tags", str(stolen_tags)],
        stdout=subprocess.PIPE, text=True)


def _bare_paho(broker: BrokerAddress, root: str, seconds: float, lean: bool = False) -> float:
    """Messages/s of a paho subscriber that only counts them, acknowledging each as paho
    does by default. `lean`: on the worker's own reads client (`ingest.mqtt`), which
    parses a PUBLISH itself, to tell what that saves from what the pipeline costs."""
    count = [0]
    kind = ReadsClient if lean else paho.Client
    client = kind(CallbackAPIVersion.VERSION2, client_id=f"bare-{uuid.uuid4().hex}",
                  protocol=paho.MQTTv5, manual_ack=lean)

    def on_message(*_: object) -> None:
        count[0] += 1

    def on_read(_topic: str, _payload: bytes, mid: int) -> None:
        count[0] += 1
        client.ack(mid, 1)

    client.on_message = on_message
    if isinstance(client, ReadsClient):
        client.on_read = on_read
    _subscribe(client, broker.port, f"{root}/stations/+/reads")
    pub = _start_publisher(broker, root, seconds)
    pub.wait()
    time.sleep(1.0)
    client.loop_stop()
    client.disconnect()
    return count[0] / seconds


async def _bare_aiomqtt(broker: BrokerAddress, root: str, seconds: float) -> float:
    import aiomqtt

    count = 0
    async with aiomqtt.Client("127.0.0.1", broker.port, username=DEMO_USER,
                              password=DEMO_USER) as client:
        await client.subscribe(f"{root}/stations/+/reads", qos=1)
        pub = _start_publisher(broker, root, seconds)
        deadline = time.monotonic() + seconds + 2
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                async for _ in client.messages:
                    count += 1
        except TimeoutError:
            pass
        await asyncio.to_thread(pub.wait)
    return count / seconds


def webhook_main(argv: list[str]) -> None:
    """A police webhook on loopback: print "ready <port>" once listening and, when stdin
    closes, when each alert arrived (webhook-id -> wall-clock ms) as one JSON object. A
    process of its own, as the police subscriber is: a receiver in the worker's process
    shares the worker's interpreter lock, and the time it noted an alert included its
    wait for that lock, which no police system's server has."""
    del argv
    arrived: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        # Keeps the connection open between requests, as a police system's web server
        # would: with HTTP/1.0 each alert paid for a new TCP connection.
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            arrived.setdefault(self.headers["webhook-id"], wall_ms())
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"ready {server.server_address[1]}", flush=True)
    sys.stdin.read()  # until the bench closes it
    server.shutdown()
    server.server_close()
    print(json.dumps(arrived), flush=True)


class _Receiver:
    """A process of `simulator.bench` that reports when each alert reached it: the
    police subscriber (`police_main`) or the police webhook (`webhook_main`)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "simulator.bench", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        said = self.proc.stdout.readline().split()  # nothing if it ended first
        if said[:1] != ["ready"]:
            self.proc.kill()
            raise RuntimeError(f"the {args[0]} receiver did not start")
        self.said = said[1:]  # what it told after "ready": the webhook's port

    def arrived(self) -> dict[str, int]:
        """Stop it: alert_id -> when it arrived, wall-clock ms."""
        out, _ = self.proc.communicate(timeout=30)
        return dict(json.loads(out))


@dataclass(slots=True)
class WorkerRun:
    """What one worker run measured."""

    reads_per_s: float = 0.0
    alert_ms: list[float] = field(default_factory=list)    # read received to MQTT PUBACK
    police_ms: list[float] = field(default_factory=list)   # ... to a police subscriber
    webhook_ms: list[float] = field(default_factory=list)  # read received to webhook 2xx
    commit_ms: list[float] = field(default_factory=list)   # ... to its alert committed
    committed: dict[str, int] = field(default_factory=dict)  # alert_id -> when committed
    police_after_commit_ms: list[float] = field(default_factory=list)  # commit to police
    rss_before: int = 0  # MB, the worker ready and no load yet
    rss_end: int = 0
    rss_samples: list[int] = field(default_factory=list)  # MB, every `sample_s` under load
    pid: int = field(default_factory=os.getpid)  # the process the worker ran in


async def _worker_run(broker: BrokerAddress, seconds: float, fmt: str, rate: float = 0,
                      stolen_every: int = 0, db_url: str | None = None,
                      open_cases: int = 1, webhook: _Receiver | None = None,
                      sample_s: float = 0) -> WorkerRun:
    """One worker in this process, fed by the publisher process for `seconds`. With
    `sample_s`, memory is also sampled and printed every `sample_s` seconds (`_memory`)."""
    from sqlalchemy import select

    from ingest.service import Worker, keep_large_buffers_apart
    from registry.cases import report_theft
    from registry.db import open_database
    from registry.imports import import_vehicles
    from registry.models import Alert

    with tempfile.TemporaryDirectory() as tmp:
        root = f"bench{uuid.uuid4().hex[:6]}"
        hooks = ("[]" if webhook is None else f'[{{"name": "bench", "url": '
                 f'"http://127.0.0.1:{webhook.said[0]}/", "secrets": ["whsec_YmVuY2g="]}}]')
        settings = Settings.load(None, broker.settings_overrides() | {
            "BIKEWATCH_DB_URL": db_url or f"sqlite+aiosqlite:///{tmp}/b.db",
            "BIKEWATCH_MQTT_ROOT": root,
            "BIKEWATCH_HTTP": f"127.0.0.1:{free_port()}",
            "BIKEWATCH_CLIENT_ID": f"benchw-{uuid.uuid4().hex[:6]}",
            "BIKEWATCH_WEBHOOKS": hooks})
        engine = await open_database(settings.db_url)
        # The stolen reads take these tags in turn (the publisher's --stolen-tags).
        stolen = [STOLEN_TAG + i for i in range(open_cases)]
        await import_vehicles(engine, "tag,plate,owner_name,owner_phone,brand,color\n" + "".join(
            f"{t:08x},P,N,1,B,C\n" for t in stolen))
        for i, t in enumerate(stolen):
            await report_theft(engine, t, f"BENCH-{i}", 0, wall_ms())
        keep_large_buffers_apart()  # as `bikewatch serve` does: the memory figure is its
        worker = Worker(settings, engine, freeze_when_ready=True)  # as `bikewatch serve`
        run = WorkerRun()

        def on_alert(a: RaisedAlert, acked: int) -> None:
            run.alert_ms.append(acked - a.received_ms)
            if a.committed_ms:
                run.commit_ms.append(a.committed_ms - a.received_ms)
                run.committed[a.alert_id] = a.committed_ms

        worker.on_alert = on_alert
        task = asyncio.create_task(worker.run())
        await worker.ready.wait()
        await asyncio.sleep(0.5)
        run.rss_before = _rss_mb()

        def reads() -> float:
            return worker.registry.get_sample_value("bikewatch_reads_total") or 0.0

        police = None if webhook is None else await asyncio.to_thread(
            _Receiver, "police", "--port", str(broker.port), "--root", root)
        pub = _start_publisher(broker, root, seconds + 2, fmt, rate, stolen_every, open_cases)
        await asyncio.sleep(1.0)  # warm up
        r0, t0 = reads(), time.monotonic()
        if sample_s:
            print(f"  {0:>5.0f} s: {_memory(worker)}", flush=True)
            while (left := t0 + seconds - time.monotonic()) > 0:
                await asyncio.sleep(min(sample_s, left))
                run.rss_samples.append(_rss_mb())
                print(f"  {time.monotonic() - t0:>5.0f} s: {_memory(worker)}", flush=True)
        else:
            await asyncio.sleep(seconds)
        r1, t1 = reads(), time.monotonic()
        run.rss_end = _rss_mb()
        await asyncio.to_thread(pub.wait)
        await asyncio.sleep(1.0 if webhook else 0)  # the last deliveries
        if webhook is not None and police is not None:
            async with engine.connect() as conn:
                received = dict((await conn.execute(
                    select(Alert.alert_id, Alert.received_ms))).all())
            run.webhook_ms = [t - received[a] for a, t in
                              (await asyncio.to_thread(webhook.arrived)).items() if a in received]
            arrived = await asyncio.to_thread(police.arrived)
            run.police_ms = [t - received[a] for a, t in arrived.items() if a in received]
            run.police_after_commit_ms = [t - run.committed[a] for a, t in arrived.items()
                                          if a in run.committed]
        worker.stop.set()
        await task
        await engine.dispose()
        run.reads_per_s = (r1 - r0) / (t1 - t0)
        return run


def _soak_process(broker: BrokerAddress, seconds: float, rate: float, db_url: str | None,
                  sample_s: float, out: Any) -> None:
    """The soak, in a process spawned for it: the RSS it reports is one worker's, not
    that of a bench process that has run the other figures' brokers' clients, workers
    and webhook servers first."""
    out.send(eventloop.run(_worker_run(broker, seconds, "binary", rate=rate, db_url=db_url,
                                     sample_s=sample_s)))


async def run_soak(broker: BrokerAddress, seconds: float, rate: float, db_url: str | None,
                   sample_s: float = SOAK_SAMPLE_S) -> WorkerRun:
    """`seconds` of one worker at `rate` batches/s, its memory every `sample_s`."""
    ctx = multiprocessing.get_context("spawn")
    theirs, ours = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_soak_process, args=(broker, seconds, rate, db_url, sample_s, ours),
                        name="bikewatch-soak")
    child.start()
    ours.close()
    try:
        run: WorkerRun | None = await asyncio.to_thread(theirs.recv)
    except EOFError:  # it ended without sending: its traceback is on stderr
        run = None
    await asyncio.to_thread(child.join)
    if run is None:
        raise RuntimeError(f"the soak process ended without its figures "
                           f"(exit code {child.exitcode})")
    return run


def _sqlite_heap_mb() -> float | None:
    """What SQLite itself holds (page caches above all), process-wide; None where the
    library cannot be reached."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        return float(lib.sqlite3_memory_used()) / 2**20
    except (OSError, AttributeError):
        return None


def _memory(worker: Worker) -> str:
    """One soak sample: where the worker's memory is, to tell growth from a leak."""
    heap = _sqlite_heap_mb()
    pool: Any = worker.engine.sync_engine.pool
    return (f"RSS {_rss_mb()} MB, SQLite heap "
            f"{'?' if heap is None else f'{heap:.0f}'} MB, open visits "
            f"{len(worker.pipeline.tracker):,}, database connections "
            f"{pool.checkedin() + pool.checkedout()}, Python objects {len(gc.get_objects()):,}")


def _rss_mb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


async def bench_e2e(seconds: float, soak: float, db_url: str | None, report: Report) -> None:
    broker = start_broker()
    try:
        print(f"\n== end to end through {broker.kind} on 127.0.0.1, QoS 1, "
              f"database {db_url or 'SQLite (a temporary file)'}, "
              f"{READS_PER_BATCH} reads per batch ({BIKES_IN_RANGE} bikes in range, "
              f"{VISIT_BATCHES} batches a visit), {STATIONS} stations, {seconds:.0f} s each ==")
        bare = await asyncio.to_thread(_bare_paho, broker, f"bare{uuid.uuid4().hex[:6]}",
                                       seconds)
        print(f"bare paho subscriber:      {bare:>10,.0f} messages/s "
              f"({bare * READS_PER_BATCH:,.0f} reads/s)")
        lean = await asyncio.to_thread(_bare_paho, broker, f"lean{uuid.uuid4().hex[:6]}",
                                       seconds, True)
        print(f"bare subscriber on the worker's reads client: {lean:>10,.0f} messages/s "
              f"({lean / bare:.2f} of paho's own)")
        report.add("end to end", "bare subscriber, the worker's reads client", lean, "msg/s",
                   bare, "a bare paho subscriber")
        aio = await _bare_aiomqtt(broker, f"aio{uuid.uuid4().hex[:6]}", seconds)
        print(f"bare aiomqtt subscriber:   {aio:>10,.0f} messages/s ({aio / bare:.2f} of paho)")
        report.add("end to end", "bare aiomqtt subscriber", aio, "msg/s", bare,
                   "a bare paho subscriber")
        for fmt in ("binary", "json"):
            rate = (await _worker_run(broker, seconds, fmt, db_url=db_url)).reads_per_s
            print(f"worker, {fmt:<6}:            {rate:>10,.0f} reads/s = "
                  f"{rate / READS_PER_BATCH:,.0f} batches/s ({rate / READS_PER_BATCH / bare:.2f} "
                  f"of the bare subscriber)")
            report.add("end to end", f"worker, {fmt}", rate, "reads/s", bare * READS_PER_BATCH,
                       "a bare paho subscriber")
            report.add("end to end", f"worker, {fmt}, against its own reads client", rate,
                       "reads/s", lean * READS_PER_BATCH, "a bare subscriber on that client")
            if fmt == "binary":
                top = rate / READS_PER_BATCH
        half = top / 2
        webhook = _Receiver("webhook")
        try:
            timed = await _worker_run(broker, seconds, "binary", rate=half,
                                      stolen_every=STATIONS + 1, db_url=db_url,
                                      open_cases=OPEN_CASES, webhook=webhook)
        finally:
            if webhook.proc.poll() is None:
                webhook.proc.kill()
        print(f"alert latency at half load ({half:,.0f} batches/s, {OPEN_CASES:,} open cases), "
              "read received to:")
        for channel, ms in (("its alert committed (the database's share)", timed.commit_ms),
                            ("MQTT PUBACK", timed.alert_ms),
                            ("MQTT at a police subscriber", timed.police_ms),
                            ("webhook 2xx", timed.webhook_ms)):
            if ms:
                p50, p99 = np.percentile(ms, [50, 99])
                print(f"  {channel}: {len(ms)} alerts, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
                report.add("alert latency", f"{channel}, p99 at half load", p99, "ms", p50,
                           "its own p50")
        if timed.police_after_commit_ms:
            p50, p99 = np.percentile(timed.police_after_commit_ms, [50, 99])
            print(f"  from its commit to a police subscriber (the broker's share): "
                  f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        with tempfile.TemporaryDirectory() as tmp:
            await bench_workers(broker, seconds, db_url or f"sqlite+aiosqlite:///{tmp}/w.db",
                                report, _start_publisher)
        if soak:
            # Full load is the most the worker carries (measured above), not all the
            # publisher can send: beyond it the backlog grows in the broker without end
            # (2.9 GB in 5 minutes, measured), and the broker, slowed by it, is what the
            # run measures.
            print(f"soak of {soak:.0f} s at full load ({top:,.0f} batches/s), "
                  f"memory every {SOAK_SAMPLE_S:.0f} s:")
            soaked = await run_soak(broker.address(), soak, top, db_url)
            first, *_ = soaked.rss_samples or [soaked.rss_end]
            print(f"soak {soak:.0f} s at full load in a process of its own: "
                  f"{soaked.reads_per_s:,.0f} reads/s; RSS {soaked.rss_before} MB before the "
                  f"load, {first} MB after its first {SOAK_SAMPLE_S:.0f} s, "
                  f"{min(soaked.rss_samples, default=first)} to "
                  f"{max(soaked.rss_samples, default=first)} MB from then on, "
                  f"{soaked.rss_end} MB at the end")
            report.add("memory", f"RSS at the end of a {soak:.0f} s soak", soaked.rss_end, "MB",
                       first, f"RSS after its first {SOAK_SAMPLE_S:.0f} s")
    finally:
        broker.stop()


async def run_bench(args: argparse.Namespace, settings: Settings, stop: asyncio.Event) -> int:
    del settings, stop  # the bench owns its broker and databases
    report = Report()
    bench_matching(args.quick, report)
    bench_decode(report)
    bench_fold(args.quick, report)
    bench_health(args.quick, report)
    await bench_forecast(args.quick, report)
    vehicles = args.registry_vehicles
    if vehicles is None:
        vehicles = 20_000 if args.quick else 1_000_000
    if vehicles:
        await bench_registry(vehicles, args.db_url, report)
    if not args.skip_e2e:
        await bench_e2e(args.seconds, args.soak, args.db_url, report)
    print("\n== every figure beside its baseline from this run ==")
    print(report.table())
    if args.json:
        report.write(args.json)
        print(f"written to {args.json}")
    return 0



if __name__ == "__main__" and sys.argv[1:2] == ["publish"]:
    publish_main(sys.argv[2:])
elif __name__ == "__main__" and sys.argv[1:2] == ["police"]:
    police_main(sys.argv[2:])
elif __name__ == "__main__" and sys.argv[1:2] == ["webhook"]:
    webhook_main(sys.argv[2:])
