"""`bikewatch demo`: the whole system on one machine, nothing installed beforehand.

A broker of its own on 127.0.0.1 (mosquitto where installed, else amqtt),
SQLite in a temporary folder (or --data), a 4x4-station town with 300 bikes,
and one theft staged a few seconds in. The police side is a real MQTT
subscriber on `{root}/alerts/#`; every alert it receives is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import socket
import tempfile
import threading
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console

from ingest.broker import start_broker
from ingest.clock import wall_ms
from ingest.config import Settings
from ingest.service import Worker
from registry.cases import report_theft
from registry.db import open_database
from registry.imports import import_stations, import_vehicles
from registry.tags import format_tag
from registry.tokens import create_token
from simulator.publisher import StationPublisher
from simulator.run import drive
from simulator.town import Town

THEFT_AFTER_S = 5.0
console = Console(highlight=False)


def _http_address() -> str:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8080))
            return "127.0.0.1:8080"
        except OSError:
            s.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{s.getsockname()[1]}"


def _police(settings: Settings, out: asyncio.Queue[dict[str, object]],
            loop: asyncio.AbstractEventLoop) -> paho.Client:
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
            loop.call_soon_threadsafe(out.put_nowait, orjson.loads(m.payload))

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(ep.host, ep.port)
    client.loop_start()
    connected.wait(10)
    return client


def _show(alert: dict[str, object]) -> None:
    st = alert["station"]
    assert isinstance(st, dict)
    traj = alert.get("trajectory") or []
    assert isinstance(traj, list)
    path = " → ".join(str(v["station"]) for v in traj)
    ahead = alert.get("next_stations") or []
    assert isinstance(ahead, list)
    nxt = ", ".join(str(x) for x in ahead) or "unknown"
    when = dt.datetime.fromtimestamp(int(str(alert["seen_ms"])) / 1000, tz=dt.UTC)
    console.print(
        f"[bold red]ALERT[/] {alert['kind']} case [bold]{alert['case_id']}[/] "
        f"update {alert['update']}: tag {alert['tag']} at [bold]{st['id']}[/] "
        f"({st['name']}, zone {st['zone']}) seen {when:%H:%M:%S}Z, "
        f"speed {alert['speed_kmh']} km/h, heading {alert['heading_deg']}; path {path}; "
        f"likely next {nxt}")


async def run_demo(args: argparse.Namespace, stop: asyncio.Event) -> int:
    broker = start_broker()
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
    loop = asyncio.get_running_loop()
    alerts: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    police = None
    pub = None
    try:
        town = Town(seed=args.seed)
        now = wall_ms()
        r1 = await import_stations(engine, town.stations_csv(), now)
        r2 = await import_vehicles(engine, town.vehicles_csv())
        console.print(f"registry: {r1.summary('stations')}; {r2.summary('vehicles')}")
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
            police = await asyncio.to_thread(_police, settings, alerts, loop)
            pub = StationPublisher(settings.mqtt_endpoint(), settings.mqtt_root,
                                   binary_share=0.7)
            await asyncio.to_thread(pub.connect)
            traffic = tg.create_task(drive(town, pub, stop, duration_s=args.duration),
                                     name="traffic")
            await asyncio.sleep(THEFT_AFTER_S)
            tag = town.moving_bike()
            result = await report_theft(engine, tag, "LH-DEMO-0001", wall_ms() - 60_000,
                                        wall_ms())
            console.print(f"[yellow]theft reported[/]: {result.message}; "
                          f"watch for tag {format_tag(tag)} passing a station")
            while not traffic.done():  # ends on --duration, Ctrl-C or SIGTERM
                with contextlib.suppress(TimeoutError):
                    _show(await asyncio.wait_for(alerts.get(), 1.0))
            await traffic
            while not alerts.empty():
                _show(alerts.get_nowait())
            reads = worker.registry.get_sample_value("bikewatch_reads_total") or 0
            target = worker.health.target()
            console.print(f"done: {int(reads)} reads accepted, stations online "
                          f"{worker.health.online_ratio():.0%} (target {target.ratio:.0%}, "
                          f"stage {target.stage}); `bikewatch report uptime` has the detail")
            worker.stop.set()
    finally:
        if police is not None:
            police.loop_stop()
            police.disconnect()
        if pub is not None:
            pub.close()
        await engine.dispose()
        broker.stop()
        if tmp is not None:
            tmp.cleanup()
    return 0
