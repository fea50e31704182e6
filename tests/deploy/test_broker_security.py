"""deploy/mosquitto.conf and deploy/mosquitto.acl on a real Mosquitto: passwords for
everyone, TLS for clients off the host, and an ACL under which a station publishes
as itself only and reads nothing, the police read alerts only, and the worker, over
TLS with its own credentials, takes every station's reads and raises the alerts."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from ingest.broker import free_port
from ingest.clock import wall_ms
from ingest.config import MqttEndpoint, Settings
from simulator.publisher import StationPublisher
from tests.conftest import tool
from tests.helpers import STOLEN, Police, running_worker, stage_registry, until

pytestmark = pytest.mark.broker
DEPLOY = Path(__file__).parents[2] / "deploy"
USERS = {"bikewatch": "worker-secret", "police": "police-secret", "SP-0040": "s40-secret",
         "SP-0042": "s42-secret"}
ROOT = "bikewatch"  # the ACL's root, as shipped


class SecureBroker:
    """The shipped configuration, with its ports and paths moved into a temporary dir."""

    def __init__(self, tmp: Path) -> None:
        mosquitto, passwd = tool("mosquitto", "mosquitto"), tool("mosquitto_passwd", "mosquitto")
        openssl = tool("openssl", "openssl")
        self.plain, self.tls = free_port(), free_port()
        certs = tmp / "certs"
        certs.mkdir()
        self.ca = certs / "ca.crt"
        _certificates(openssl, certs)
        conf = (DEPLOY / "mosquitto.conf").read_text()
        conf = conf.replace("listener 1883 127.0.0.1", f"listener {self.plain} 127.0.0.1")
        conf = conf.replace("listener 8883", f"listener {self.tls} 127.0.0.1")
        conf = conf.replace("/etc/mosquitto/", f"{tmp}/").replace("/var/lib/mosquitto/",
                                                                  f"{tmp}/")
        # As root, mosquitto would switch to its own user, who cannot read the test's files.
        (tmp / "mosquitto.conf").write_text(conf + f"log_dest file {tmp}/mosquitto.log\n"
                                            f"log_type all\nuser {getpass.getuser()}\n")
        shutil.copy(DEPLOY / "mosquitto.acl", tmp / "bikewatch.acl")
        for user, password in USERS.items():
            subprocess.run([passwd, "-b", *(["-c"] if user == "bikewatch" else []),
                            str(tmp / "bikewatch.passwd"), user, password], check=True,
                           capture_output=True, timeout=30)
        self.proc = subprocess.Popen([mosquitto, "-c", str(tmp / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not all(_listening(p) for p in (self.plain, self.tls)):
            assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.05)

    def url(self, user: str | None, *, tls: bool = True, password: str | None = None) -> str:
        who = f"{user}:{password or USERS[user]}@" if user else ""
        return f"{'mqtts' if tls else 'mqtt'}://{who}127.0.0.1:{self.tls if tls else self.plain}"

    def settings(self, user: str, db_url: str = "sqlite+aiosqlite:///unused.db") -> Settings:
        return Settings.load(None, {
            "BIKEWATCH_MQTT_URL": self.url(user), "BIKEWATCH_MQTT_CA_FILE": str(self.ca),
            "BIKEWATCH_DB_URL": db_url, "BIKEWATCH_MQTT_ROOT": ROOT,
            "BIKEWATCH_CLIENT_ID": f"{user}-{uuid.uuid4().hex[:6]}",
            "BIKEWATCH_HTTP": f"127.0.0.1:{free_port()}"})

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def _certificates(openssl: str, out: Path) -> None:
    """A CA, and a server certificate for 127.0.0.1 that it signed."""
    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=out, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")
    (out / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt")


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBroker]:
    broker = SecureBroker(tmp_path)
    yield broker
    broker.stop()


def _connect(ep: MqttEndpoint) -> tuple[paho.Client, str]:
    """A client's connection answer: "Success" or why the broker refused it."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex,
                         protocol=MQTTProtocolVersion.MQTTv5)
    ep.secure(client)
    answered = threading.Event()
    answer: list[str] = []

    def on_connect(_c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        answer.append(str(reason))
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(ep.host, ep.port)
    except ssl.SSLError as exc:
        return client, f"TLS: {exc.reason}"
    client.loop_start()
    answered.wait(10)
    return client, (answer or ["no answer"])[0]


class Listener:
    """A client that keeps the topics of every message it gets."""

    def __init__(self, ep: MqttEndpoint, topic: str) -> None:
        self.topics: list[str] = []
        self.client, self.answer = _connect(ep)
        self.client.on_message = lambda _c, _u, m: self.topics.append(m.topic)
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def test_stations_publish_as_themselves_police_read_alerts_only(
        secure: SecureBroker, sqlite_url: str) -> None:
    anonymous = _connect(Settings.load(None, {"BIKEWATCH_MQTT_URL": secure.url(
        None, tls=False)}).mqtt_endpoint())
    wrong = _connect(Settings.load(None, {"BIKEWATCH_MQTT_URL": secure.url(
        "SP-0040", tls=False, password="guess")}).mqtt_endpoint())
    for client, _ in (anonymous, wrong):
        client.loop_stop()
    assert anonymous[1] != "Success" and wrong[1] != "Success"
    no_ca = _connect(MqttEndpoint("127.0.0.1", secure.tls, "police", USERS["police"], True))
    assert no_ca[1] == "TLS: CERTIFICATE_VERIFY_FAILED"  # not a CA the system trusts

    await stage_registry(sqlite_url)
    worker_settings = secure.settings("bikewatch", sqlite_url)
    station = StationPublisher(secure.settings("SP-0040").mqtt_endpoint(), ROOT,
                               client_id="SP-0040")
    station.connect()
    police = Police(secure.settings("police"), f"{ROOT}/alerts/+")
    prying = Listener(secure.settings("SP-0040").mqtt_endpoint(), f"{ROOT}/alerts/+")
    watcher = Listener(worker_settings.mqtt_endpoint(), f"{ROOT}/stations/SP-0042/#")
    try:
        async with running_worker(worker_settings) as worker:
            await until(lambda: len(worker.holder.current) == 1, 5)
            t = wall_ms()
            station.reads("SP-0040", np.array([STOLEN], np.uint64), np.array([t]),
                          np.array([-50]), t)
            alerts = await police.wait_for(1)
            # as another station: the broker drops it, no read and no alert come of it
            station.reads("SP-0042", np.array([STOLEN], np.uint64), np.array([t + 90_000]),
                          np.array([-50]), t)
            await asyncio.sleep(1.5)
            assert station.flush(5)
    finally:
        station.close()
        police.close()
        prying.close()
        watcher.close()
    assert [a["station"]["id"] for a in alerts] == ["SP-0040"]
    assert len(police.alerts) == 1
    assert watcher.topics == []  # nothing was published as SP-0042
    assert prying.topics == []   # a station reads no alerts
    log = (Path(secure.ca).parents[1] / "mosquitto.log").read_text()
    assert re.search(r"Denied PUBLISH from SP-0040 .*stations/SP-0042/reads", log), log[-2000:]


def _mosquitto_rules() -> set[tuple[str, str, str]]:
    """(who, subscribe|publish, topic) granted by deploy/mosquitto.acl."""
    rules, who = set(), ""
    for line in (DEPLOY / "mosquitto.acl").read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            who = words[1]
        elif words[0] in ("topic", "pattern"):
            access, topic = words[1], words[2]
            actor = who if words[0] == "topic" else "all"
            for action in {"read": ["subscribe"], "write": ["publish"],
                           "readwrite": ["subscribe", "publish"]}[access]:
                rules.add((actor, action, topic.replace("%u", "${username}")))
    return rules


def test_emqx_grants_what_mosquitto_grants_and_nothing_else() -> None:
    text = (DEPLOY / "emqx" / "acl.conf").read_text()
    rules: set[tuple[str, str, str]] = set()
    for m in re.finditer(r'^\{allow, (all|\{username, "([^"]+)"\}), (\w+), \[([^\]]*)\]\}\.',
                         text, re.M):
        who = m.group(2) or "all"
        for topic in re.findall(r'"([^"]+)"', m.group(4)):
            rules.add((who, m.group(3), topic))
    assert text.rstrip().endswith("{deny, all}.")
    shared = {r for r in rules if r[2].startswith("$share/")}
    assert rules - shared == _mosquitto_rules()
    assert shared == {("bikewatch", "subscribe", "$share/bikewatch/bikewatch/stations/#")}
    conf = (DEPLOY / "emqx" / "emqx.conf").read_text()
    for needed in ("no_match = deny", 'path = "etc/bikewatch-acl.conf"',
                   "listeners.ssl.default", "backend = built_in_database",
                   'listeners.tcp.default.bind = "127.0.0.1:1883"'):
        assert needed in conf, needed
