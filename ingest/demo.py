"""`bikewatch demo`: the whole system on one machine, nothing installed beforehand.

A broker of its own on 127.0.0.1 (mosquitto where installed, else amqtt),
SQLite in a temporary folder (or --data), a simulated town (`simulator`) of
24 stations and 2,000 bikes on its morning commute, each station with its own
MQTT connection and Last Will, a theft about every minute from half a minute
in, reported by its owner within seconds, now and then a station outage and a
malformed payload. The police side is a real MQTT subscriber on
`{root}/alerts/+`; the live view shows what it receives, beside the stations
online against the target and the reads per second.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from ingest.broker import start_broker
from ingest.clock import wall_ms
from ingest.config import Settings
from ingest.service import Worker
from registry.db import open_database
from registry.tokens import create_token
from simulator.day import Scenario
from simulator.live import alert_line, demo_view
from simulator.run import Clerk, Fleet, Progress, Rate
from simulator.session import Session, console, live, register
from simulator.town import Town

STATIONS, BIKES = 24, 2_000
DAY_START_MS = (7 * 60 + 30) * 60_000  # the town's clock at the start: the morning peak
DEMO = Scenario(theft_rate=50, outage_rate=1.0, skewed=1, quick_reports=True, night_share=0)
BAD_RATE = 0.005


def _http_address() -> str:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8080))
            return "127.0.0.1:8080"
        except OSError:
            s.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{s.getsockname()[1]}"


def _police(settings: Settings, out: list[dict[str, Any]]) -> paho.Client:
    """A police receiver, as an integration would be: subscribed to every zone."""
    ep = settings.mqtt_endpoint()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bikewatch-demo-police")
    ep.secure(client)
    connected = threading.Event()
    zones = f"{settings.mqtt_root}/alerts/+"  # zones are one topic level

    def on_connect(c: paho.Client, *_: object) -> None:
        c.subscribe(zones, qos=1)
        connected.set()

    def on_message(_c: paho.Client, _u: object, m: paho.MQTTMessage) -> None:
        # amqtt 0.12 was seen sending subscribers retained messages of other topics
        if paho.topic_matches_sub(zones, m.topic):
            out.append(orjson.loads(m.payload))  # list.append is atomic: no lock

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(ep.host, ep.port)
    client.loop_start()
    connected.wait(10)
    return client


async def run_demo(args: argparse.Namespace, stop: asyncio.Event) -> int:
    broker = start_broker()  # stopped last, below
    tmp = None if args.data else tempfile.TemporaryDirectory(prefix="bikewatch-demo-")
    data = Path(args.data or (tmp.name if tmp else "."))
    await asyncio.to_thread(data.mkdir, parents=True, exist_ok=True)
    env = broker.settings_overrides() | {
        "BIKEWATCH_DB_URL": f"sqlite+aiosqlite:///{data / 'bikewatch.db'}",
        "BIKEWATCH_HTTP": _http_address(), "BIKEWATCH_CLIENT_ID": "bikewatch-demo-worker"}
    settings = Settings.load(None, env)
    console.print(f"[bold]bikewatch demo[/]: broker {broker.kind} on 127.0.0.1:{broker.port}, "
                  f"database {data / 'bikewatch.db'}")
    engine = await open_database(settings.db_url)
    alerts: list[dict[str, Any]] = []
    police = None
    try:
        town = Town(seed=args.seed, stations=STATIONS, bikes=BIKES)
        console.print(f"registry: {await register(engine, town)}")
        worker = Worker(settings, engine)
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(worker.run(), name="worker")
            await asyncio.wait({run, tg.create_task(worker.ready.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                return 2
            ops = await create_token(engine, "ops", "demo-ops", wall_ms())
            police_token = await create_token(engine, "police", "demo-police", wall_ms())
            console.print(f"API and /metrics on http://{settings.http} (docs at /docs); "
                          f"tokens: ops {ops}, police {police_token}\n"
                          f"  curl -H 'Authorization: Bearer {ops}' "
                          f"http://{settings.http}/metrics")
            police = await asyncio.to_thread(_police, settings, alerts)
            fleet = Fleet(settings.mqtt_endpoint(), settings.mqtt_root, town.station_ids,
                          client_prefix="bikewatch-demo-station")
            session = Session(town, fleet, Clerk(engine, asyncio.get_running_loop()), DEMO,
                              1.0, BAD_RATE, DAY_START_MS, Progress())
            rate = Rate()

            def view() -> object:
                reads = worker.registry.get_sample_value("bikewatch_reads_total") or 0.0
                target = worker.health.target()
                return demo_view(session.progress, session.midnight_ms, len(town.station_ids),
                                 worker.health.online_ratio(), target.ratio, target.stage,
                                 reads, rate(reads), alerts)

            await live(session, args.duration, stop, view)
            for a in alerts:
                console.print(alert_line(a, session.midnight_ms))
            reads = worker.registry.get_sample_value("bikewatch_reads_total") or 0
            target = worker.health.target()
            console.print(f"done: {int(reads)} reads accepted, {len(alerts)} alerts, stations "
                          f"online {worker.health.online_ratio():.0%} (target "
                          f"{target.ratio:.0%}, stage {target.stage}); `bikewatch report "
                          f"uptime` has the detail")
            worker.stop.set()
    finally:
        if police is not None:
            police.loop_stop()
            police.disconnect()
        await engine.dispose()
        broker.stop()
        if tmp is not None:
            tmp.cleanup()
    return 0

