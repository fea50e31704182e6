"""Publishing station traffic to a broker with the real protocol (PROTOCOL.md 1, 2).

One paho client publishes for every station (multiplexed), or for one station
only, with that station's Last Will (`will`): `offline` on its status topic,
retained, which the broker publishes when the connection dies without a
DISCONNECT (`cut`), as it does when a station loses power. QoS 1 publishes in
flight are capped well below 65,535 (16-bit message ids: past that,
publishing silently breaks), by waiting on PUBACKs.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

import numpy as np
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from ingest.codec import encode_binary, encode_json
from ingest.config import MqttEndpoint

MAX_INFLIGHT = 1000


@dataclass(slots=True)
class StationPublisher:
    endpoint: MqttEndpoint
    root: str
    client_id: str = "bikewatch-sim"
    binary_share: float = 1.0  # share of batches sent as binary; the rest JSON
    boot: int = 1
    will: str | None = None    # the one station this client speaks for
    boots: dict[str, int] = field(default_factory=dict)  # stations rebooted since
    seq: dict[str, int] = field(default_factory=dict)
    sent_batches: int = 0
    sent_reads: int = 0
    _client: paho.Client = field(init=False)
    _slots: threading.BoundedSemaphore = field(init=False)
    _rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                   protocol=MQTTProtocolVersion.MQTTv311)
        self.endpoint.secure(self._client)
        if self.will is not None:
            self._client.will_set(self._status_topic(self.will), b"offline", qos=1, retain=True)
        self._client.max_inflight_messages_set(MAX_INFLIGHT)
        self._slots = threading.BoundedSemaphore(MAX_INFLIGHT)
        self._client.on_publish = lambda *_: self._slots.release()
        self._rng = np.random.default_rng(self.boot)

    def connect(self) -> None:
        self._client.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
        self._client.loop_start()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def cut(self) -> None:
        """Drop the connection as a power cut would: no DISCONNECT, so the broker
        publishes the Last Will."""
        self._client.reconnect_delay_set(3600, 3600)  # the network thread must not redial
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)  # the broker sees the end now: it sends the Will
        self._client.loop_stop()  # the thread notices within a second

    def reboot(self, station: str) -> None:
        """A new boot: seq starts again from 1."""
        self.boots[station] = self.boots.get(station, self.boot) + 1
        self.seq[station] = 0

    def _status_topic(self, station: str) -> str:
        return f"{self.root}/stations/{station}/status"

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self._slots.acquire()
        self._client.publish(topic, payload, qos=1, retain=retain)

    def status(self, station: str, text: str) -> None:
        self._publish(self._status_topic(station), text.encode(), retain=True)

    def heartbeat(self, station: str, now_ms: int) -> None:
        self._publish(f"{self.root}/stations/{station}/heartbeat",
                      orjson.dumps({"v": 1, "boot": self.boots.get(station, self.boot),
                                    "ts_ms": now_ms}))

    def next_seq(self, station: str) -> tuple[int, int]:
        """(boot, seq) for the station's next batch."""
        seq = self.seq.get(station, 0) + 1
        self.seq[station] = seq
        return self.boots.get(station, self.boot), seq

    def reads(self, station: str, tags: np.ndarray, ts_ms: np.ndarray, rssi: np.ndarray,
              sent_ms: int, flags: np.ndarray | None = None) -> None:
        boot, seq = self.next_seq(station)
        if self._rng.random() < self.binary_share:
            base = int(ts_ms.min()) if len(ts_ms) else sent_ms
            payload = encode_binary(boot, seq, base, tags, ts_ms - base, rssi, flags=flags)
        else:
            payload = encode_json(boot, seq, sent_ms, tags.tolist(), ts_ms.tolist(),
                                  rssi.tolist(), flags=None if flags is None else flags.tolist())
        self._publish(f"{self.root}/stations/{station}/reads", payload)
        self.sent_batches += 1
        self.sent_reads += len(tags)

    def raw(self, topic: str, payload: bytes) -> None:
        self._publish(topic, payload)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every publish is acknowledged by the broker."""
        got = 0
        try:
            for _ in range(MAX_INFLIGHT):
                if not self._slots.acquire(timeout=timeout):
                    return False
                got += 1
            return True
        finally:
            for _ in range(got):
                self._slots.release()
