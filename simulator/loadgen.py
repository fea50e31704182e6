"""A load generator for the benchmarks: MQTT 3.1.1 QoS 1 publishes from pre-built packets.

paho-mqtt spends about 150 µs of Python per QoS 1 publish (properties, in-flight
bookkeeping, a PUBACK callback), so a paho publisher tops out near 6,000
messages/s here and would measure itself instead of the subscriber. This one
writes PUBLISH packets in bulk on a raw socket and counts PUBACKs (4 bytes each)
for flow control, keeping at most `window` unacknowledged, well under the 65,535
packet ids. It is for loopback benchmarks only; stations and the simulator
publish through paho.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

_CONNECT_FLAGS_USER_PASS_CLEAN = 0xC2


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    body = _string(topic.encode()) + struct.pack("!H", packet_id) + payload
    return b"\x32" + _remaining_length(len(body)) + body  # PUBLISH, QoS 1


class LoadGen:
    def __init__(self, port: int, client_id: str, user: bytes = b"bikewatch",
                 window: int = 5000) -> None:
        self.window = window
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        var = _string(b"MQTT") + bytes([4, _CONNECT_FLAGS_USER_PASS_CLEAN]) + struct.pack("!H", 60)
        body = var + _string(client_id.encode()) + _string(user) + _string(user)
        self.sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
        connack = self._recv_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"broker refused the load generator: {connack!r}")
        self.acked = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_acks, daemon=True)
        self._reader.start()

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
        return buf

    def _read_acks(self) -> None:
        pending = 0
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            pending += len(data)
            n, pending = divmod(pending, 4)  # PUBACK: 0x40 0x02 id id
            with self._cond:
                self.acked += n
                self._cond.notify_all()

    def run(self, make: Callable[[int], tuple[str, bytes]], seconds: float, rate: float = 0,
            chunk: int = 64) -> int:
        """Publish make(i) for i = 0, 1, ... for `seconds`; returns how many were sent."""
        sent, start = 0, time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            if rate and sent > elapsed * rate:
                time.sleep(0.0005)
                continue
            with self._cond:
                while sent - self.acked > self.window - chunk:
                    self._cond.wait(0.1)
            packets = []
            for i in range(sent, sent + chunk):
                topic, payload = make(i)
                packets.append(publish_packet(topic, payload, i % 65535 + 1))
            self.sock.sendall(b"".join(packets))
            sent += chunk
        deadline = time.monotonic() + 30
        with self._cond:
            while self.acked < sent and time.monotonic() < deadline:
                self._cond.wait(0.1)
        return sent

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        finally:
            self.sock.close()
