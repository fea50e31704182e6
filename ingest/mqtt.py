"""The MQTT connection: paho-mqtt 2.x in its own network thread, handing off to asyncio.

Why paho and not aiomqtt: reads must be acknowledged only after their effects
are committed (DESIGN.md decision 3). paho 2.x has `manual_ack`; aiomqtt
acknowledges on receipt and, with a capped queue, drops messages it has
already acknowledged. `bikewatch bench` measures both subscribers.

The network callback does one thing: append the message to the inbox once the
inbox has room for it (waking the event loop, if no wake-up is on its way).
The room is the in-flight bound (DESIGN.md decision 5), in messages and in
bytes. With MQTT 5 we ask the broker for a Receive Maximum, and the inbox
counts to twice that; Mosquitto 2.0.11 keeps to it only until acknowledgements
flow (see Inbox), so at full load the network thread does wait for room. With
MQTT 3.1.1 (amqtt), or a flood of large payloads, it waits likewise. While it
waits it stops reading the socket, and TCP pushes back on the broker. Either
way far fewer than 65,535 QoS 1 messages are unacknowledged (receive_maximum
is at most 30,000: Settings.validate), and memory is bounded.

The reads connection parses its QoS 1 PUBLISH packets itself and leaves the
rest to paho (`ReadsClient._read`).

Sessions are persistent (clean_start False, a long session expiry), so a
worker that dies with messages unacknowledged gets them again, or another
worker of the shared subscription does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.client import PUBACK, PUBLISH
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.config import Settings
from ingest.pipeline import Inbound

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike  # a typing Protocol only

log = logging.getLogger(__name__)

_C = TypeVar("_C", bound=paho.Client)
_PUBACK_HEAD = (PUBACK << 24) | (2 << 16)  # fixed header: type, remaining length 2
SESSION_EXPIRY_S = 7 * 24 * 3600  # a worker may be down for a week and still find its reads
READ_MOST = 1_000  # packets read a turn of the network thread's loop (ReadsClient.loop_read)
INBOX_BYTES = 64 << 20  # payloads held at once: some 20,000 ordinary JSON batches


def nodelay(client: paho.Client) -> None:
    """Send each packet at once. paho leaves Nagle's algorithm on, so an alert's PUBLISH
    waited for the TCP acknowledgement of the packet before it, which the broker
    delays: a publish took as long as the gap to the next one, 20 ms at 50 alerts/s,
    against 0.5 ms without Nagle (measured on loopback).

    For the publishing connection only. On the reads' connection it sped up nothing
    that waits (a group's PUBACKs), and at full load, where the broker sends past our
    Receive Maximum and the inbox holds the network thread back, that connection was
    dropped for its keep-alive in each of three runs (six times in 17 minutes), and in
    none of three without it (11 minutes)."""
    sock = client.socket()
    if isinstance(sock, Wrapped):
        sock = sock.sock
    if isinstance(sock, socket.socket):  # TLS sockets too (ssl.SSLSocket is one)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _none_held() -> int:
    return 0


class Wrapped:
    """A connection's socket as paho uses it, with something added by a subclass."""

    def __init__(self, sock: SocketLike) -> None:
        self.sock = sock
        # TLS: bytes decrypted and not read yet (paho asks before it waits in select,
        # once a turn of its loop: looked up once; a plain socket holds none)
        self._inner_pending: Callable[[], int] = getattr(sock, "pending", _none_held)

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def pending(self) -> int:
        return self._inner_pending()

    def send(self, buffer: bytes | bytearray) -> int:
        return self.sock.send(buffer)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)


class QuickAck(Wrapped):
    """The publishing connection's socket: what it receives is acknowledged at once.

    Mosquitto leaves Nagle's algorithm on for its clients by default
    (`set_tcp_nodelay`), so it sent an alert's PUBACK only once the one before was
    acknowledged, and Linux delays that acknowledgement until we send something (the
    next alert) or up to 40 ms pass: at 13,000 batches/s an alert's PUBACK came 20 ms
    after its read at p50, 58 at p99, where the police subscriber had the alert at 8
    and 30. With quick acknowledgements: 8 and 26 (alternated probes). Linux keeps them
    on only for a while, so each read asks again; `set_tcp_nodelay` on the broker did
    as much for the PUBACKs but took a tenth off the worker's full rate, as every read
    then came in a segment of its own. Where TCP_QUICKACK does not exist, nothing
    changes."""

    def __init__(self, sock: SocketLike) -> None:
        super().__init__(sock)
        self._set: Callable[[int, int, int], None] | None = (
            getattr(sock, "setsockopt", None) if hasattr(socket, "TCP_QUICKACK") else None)

    def recv(self, size: int) -> bytes:
        data = self.sock.recv(size)
        if self._set is not None:
            with contextlib.suppress(OSError):
                self._set(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data


class OutClient(paho.Client):
    """The publishing connection's paho client: its socket acknowledges at once
    (`QuickAck`)."""

    def _create_socket(self) -> SocketLike:
        return QuickAck(super()._create_socket())


class ReadAhead(Wrapped):
    """The reads connection's socket, read 64 KiB at a time.

    paho reads a packet in three calls or more: its first byte, its length a byte
    at a time, then the rest. Each was a system call, and each let go of the
    interpreter's lock and took it back, so at full load the event loop, which
    shares that lock, waited for the network thread four times a message.
    Here one call fetches what the broker has sent, and paho's small reads are
    served from it. paho asks `pending()` before it waits in `select` (it does so
    for TLS sockets), so bytes held here are read at once, not left waiting."""

    CHUNK = 1 << 16

    def __init__(self, sock: SocketLike) -> None:
        super().__init__(sock)
        self._buf = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._buf):
            data = self.sock.recv(max(size, self.CHUNK))  # b"" at EOF, or raises
            if len(data) <= size:
                return data
            self._buf, self._pos = data, 0
        out = self._buf[self._pos:self._pos + size]
        self._pos += len(out)
        return out

    def whole_packet(self) -> tuple[int, bytes, int] | None:
        """The next MQTT packet, when all of it is held: its first byte, the rest after
        the length, and where it ends (for `skip_to`, once taken); None when it is not
        (or its length is malformed: paho's own reading then says so). Nothing is
        consumed: a packet not taken is read by paho from the same bytes."""
        buf, pos = self._buf, self._pos
        end = len(buf)
        at, length, shift = pos + 1, 0, 0
        while at < end and shift <= 21:
            byte = buf[at]
            at += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if at + length > end:
                    return None
                return buf[pos], buf[at:at + length], at + length
            shift += 7
        return None

    def skip_to(self, pos: int) -> None:
        self._pos = pos

    def pending(self) -> int:
        return len(self._buf) - self._pos + self._inner_pending()


class ReadsClient(paho.Client):
    """The reads connection's paho client: its socket reads ahead (`ReadAhead`), a QoS 1
    PUBLISH goes straight to `on_read` (`_read`), and a group's
    acknowledgements leave together (`ack_all`)."""

    # topic, payload, packet id of a QoS 1 message; set before the connection starts
    on_read: Callable[[str, bytes, int], None] | None = None

    def _create_socket(self) -> SocketLike:
        return ReadAhead(super()._create_socket())

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """Every packet the read-ahead holds, not one a turn of paho's loop.

        paho reads one packet a turn (its `max_packets` counts only QoS 2 and outgoing
        messages), and each turn waits in `select`, checks the keep-alive under a lock
        and looks for packets to write: 28 µs of this thread's time a message at 10,000
        batches/s, more than a quarter of the worker process's. Bytes already held
        need no `select`."""
        rc = super().loop_read(max_packets)
        sock = self._sock
        if not isinstance(sock, ReadAhead):
            return rc
        ahead: ReadAhead = sock
        for _ in range(READ_MOST):
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not ahead.pending() \
                    or self._sock is not sock:  # closed, or a new connection
                break
            rc = super().loop_read(max_packets)
        return rc

    def _packet_read(self) -> MQTTErrorCode:
        """A QoS 1 PUBLISH the read-ahead holds whole, taken in one step (`_read`);
        anything else (another packet, one in pieces, a read that fails) the way paho
        reads it, byte by byte."""
        sock = self._sock
        if self._in_packet["command"] or not isinstance(sock, ReadAhead):
            return super()._packet_read()
        held = sock.whole_packet()
        if held is not None:
            command, body, end = held
            if command & 0xF0 == PUBLISH and self._read(command, body):
                sock.skip_to(end)
                self._last_bytes_received = time.monotonic()
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._packet_read()

    def _handle_publish(self) -> MQTTErrorCode:
        """A PUBLISH that paho read: ours to take (`_read`), or paho's."""
        if self._read(self._in_packet["command"], self._in_packet["packet"]):
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_publish()

    def _read(self, command: int, packet: bytes | bytearray) -> bool:
        """A QoS 1 PUBLISH's topic, packet id and payload, handed to `on_read`; False,
        and nothing done, for a packet to leave to paho.

        paho's own handling built, for every message, a `Properties` object (with MQTT
        5), a packet tuple, an `MQTTMessage` holding a `Condition`, and matched the
        topic against per-topic callbacks we do not use: two thirds of its network
        thread's time at full load, under the interpreter's lock the event loop needs
        too. Reads carry no MQTT 5 property the worker uses, so they are skipped by
        their length. Anything unusual (QoS 0 or 2, an empty topic as a topic alias
        would send, a topic that is not UTF-8, a packet too short) goes the way paho
        goes, which raises or logs as it always did."""
        if (command & 0x06) != 0x02 or self.on_read is None:
            return False
        try:
            end = 2 + int.from_bytes(packet[:2])
            topic = packet[2:end].decode()
            mid = int.from_bytes(packet[end:end + 2])
            end += 2
            if self._protocol == MQTTProtocolVersion.MQTTv5:
                size, end = _variable_int(packet, end)
                end += size
        except (IndexError, UnicodeDecodeError):
            return False
        if not topic or end > len(packet) or not mid:
            return False
        self.on_read(topic, bytes(packet[end:]), mid)
        return True

    def ack_all(self, mids: list[int]) -> None:
        """PUBACKs for these QoS 1 messages, in this order, queued as one packet.

        paho's `ack` queues a packet a message, and each costs a write to wake its
        thread (from the event loop) and a send (from that thread): two system calls
        a message, each letting go of the interpreter's lock and waiting to take it
        back. A PUBACK is four bytes, the same in MQTT 3.1.1 and 5 (reason code
        Success may be left out), so a group's go as one; paho writes the bytes as
        they are and does nothing more for an outgoing PUBACK."""
        if mids:
            self._packet_queue(PUBACK, struct.pack(f"!{len(mids)}I", *(
                _PUBACK_HEAD | mid for mid in mids)), 0, 0)


def _variable_int(data: bytes | bytearray, pos: int) -> tuple[int, int]:
    """An MQTT Variable Byte Integer at `pos` (at most 4 bytes): its value, and where the
    bytes after it begin. IndexError where it runs past the data or past 4 bytes."""
    value = 0
    for i in range(4):
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise IndexError("variable byte integer longer than 4 bytes")


class Inbox:
    """Messages from the network thread, taken by the consumer in groups.

    A message holds its place, counted and in bytes, until it is acknowledged. Over
    either bound the network thread waits (backpressure: see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int,
                 on_wait: Callable[[], None] = lambda: None,
                 max_bytes: int = INBOX_BYTES) -> None:
        self._loop = loop
        self._on_wait = on_wait
        self._items: deque[Inbound] = deque()
        self._ready = asyncio.Event()
        self._arrivals = asyncio.Event()  # the same wake-ups, for `arrived`
        self._wake_pending = False
        self.capacity = capacity
        # Twice what we advertise as Receive Maximum. Mosquitto 2.0.11 honours that only
        # until acknowledgements flow: with Receive Maximum 10 and 200 messages queued,
        # it sent 10, and after those 10 were acknowledged, 100 more (whatever its
        # max_inflight_messages). So this bound, not the broker's, holds the count, and
        # at full load the network thread does wait here.
        self._most = capacity * 2
        # Receive Maximum counts messages, not bytes: 2,000 payloads of 400 kB (a flood
        # of oversized batches) held 800 MB. A message larger than the whole budget
        # still gets in, alone.
        self._max_bytes = max_bytes
        self._held = self._held_bytes = 0
        self._looked = 0  # messages at the front already looked into (`later`)
        self._room = threading.Condition()
        self.closed = False
        self.waits = 0  # times the network thread waited for room

    def _full(self, size: int) -> bool:
        return self._held >= self._most or (
            self._held_bytes > 0 and self._held_bytes + size > self._max_bytes)

    def put_threadsafe(self, item: Inbound) -> None:
        size = len(item.payload)
        with self._room:
            if self._full(size):
                self.waits += 1
                self._on_wait()
                while self._full(size):
                    if self.closed:
                        return
                    self._room.wait(0.5)
            self._held += 1
            self._held_bytes += size
        # Straight into the deque (appends and the consumer's pops from the other end are
        # atomic), and the event loop woken only if no wake-up is on its way: a wake-up a
        # message (a callback and a write to the loop's self-pipe each) was the largest
        # cost of ours in this thread at full load, and the loop's to read them back.
        self._items.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: we are shutting down, the broker keeps it
                self.release([item])

    def _wake(self) -> None:
        self._wake_pending = False  # before the consumer runs: a later message wakes it again
        self._ready.set()
        self._arrivals.set()

    async def arrived(self) -> None:
        """Return when messages came since the last call (many may come per wake-up)."""
        await self._arrivals.wait()
        self._arrivals.clear()

    def __len__(self) -> int:
        return len(self._items)

    async def take(self, most: int) -> list[Inbound]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        n = min(most, len(self._items))
        self._looked = max(0, self._looked - n)
        return [self._items.popleft() for _ in range(n)]

    def later(self) -> tuple[list[Inbound], int]:
        """What came after the last take, all of it, and where in it begins what no
        earlier call returned: the consumer looks there for stolen sightings to store
        out of turn (`stand_in`), with their stations' messages before them."""
        looked, self._looked = self._looked, len(self._items)
        return list(self._items), looked

    def stand_in(self, picked: list[int]) -> None:
        """Take the messages at `picked` (indices into what `later` returned) out of
        turn, and leave in their places stand-ins marked `stored`: each is acknowledged
        when its turn comes, as MQTT requires PUBACKs in the order the messages came
        (3.1.1 and 5, section 4.6), and not stored again. No await may come between
        `later` and this."""
        for i in picked:
            self._items[i] = replace(self._items[i], stored=True)

    def release(self, msgs: list[Inbound]) -> None:
        with self._room:
            self._held -= len(msgs)
            self._held_bytes -= sum(len(m.payload) for m in msgs)
            self._room.notify()


class MqttLink:
    """Two connections to the broker: the worker's session (subscriptions in, their
    acknowledgements out) and one that publishes (alerts, health events)."""

    def __init__(self, settings: Settings, inbox: Inbox, clock: Callable[[], int]) -> None:
        self.settings = settings
        self.inbox = inbox
        self.clock = clock
        self._ep = settings.mqtt_endpoint()
        self._v5 = settings.mqtt_protocol == "5"
        self.client = self._client(settings.client_id, clean_session=False, manual_ack=True,
                                   kind=ReadsClient)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_read = self._on_read
        # Alerts and health events leave on a connection of their own: on the one that
        # brings the reads in, a PUBACK waited behind every read queued before it, for a
        # network thread that shares the interpreter with the hot path.
        self.out = self._client(f"{settings.client_id}-out", clean_session=True, kind=OutClient)
        self.out.max_inflight_messages_set(1000)  # our own QoS 1 publishes
        self.out_connected = threading.Event()
        self.out.on_connect = self._on_out_connect
        self.out.on_disconnect = lambda *_: self.out_connected.clear()
        self.out.on_publish = self._on_publish
        self.connected = threading.Event()
        self.connection = 0  # counts disconnects; written by the network thread only
        self.refused: str | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}  # event loop only
        self._loop = asyncio.get_running_loop()
        root = settings.mqtt_root
        reads = f"{root}/stations/+/reads"
        if settings.share_group:
            reads = f"$share/{settings.share_group}/{reads}"
        self.subscriptions = [(reads, 1), (f"{root}/stations/+/status", 1),
                              (f"{root}/stations/+/heartbeat", 1)]

    def _client(self, client_id: str, *, clean_session: bool, manual_ack: bool = False,
                kind: type[_C]) -> _C:
        """A paho client for this endpoint: protocol, credentials, TLS, capped backoff.
        With MQTT 5 the session's lifetime is set at connect time instead."""
        client = kind(
            CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else clean_session, manual_ack=manual_ack)
        self._ep.secure(client)
        client.reconnect_delay_set(min_delay=1, max_delay=30)  # capped backoff
        return client

    def start(self) -> None:
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            props.ReceiveMaximum = self.inbox.capacity
        clean = False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY  # 3.1.1: clean_session
        self.client.connect_async(self._ep.host, self._ep.port, keepalive=30, clean_start=clean,
                                  properties=props)
        self.client.loop_start()
        self.out.connect_async(self._ep.host, self._ep.port, keepalive=30)
        self.out.loop_start()

    async def wait_connected(self, timeout: float) -> bool:
        """True once both connections are up; False on a refusal or at the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.connected.is_set() and self.out_connected.is_set()) or self.refused:
                break
            await asyncio.sleep(0.05)
        return self.connected.is_set() and self.out_connected.is_set()

    def stop(self) -> None:
        self.inbox.closed = True
        for client in (self.client, self.out):
            client.disconnect()
            client.loop_stop()

    # -- network thread: hand off only ----------------------------------------

    def _accepted(self, rc: ReasonCode, which: str) -> bool:
        """False, and the refusal kept for `wait_connected`, if the broker said no."""
        if rc.is_failure:
            self.refused = str(rc)
            log.warning("broker refused the %s connection: %s", which, rc)
            return False
        return True

    def _on_connect(self, client: paho.Client, _u: object, _f: object, rc: ReasonCode,
                    _p: Properties | None) -> None:
        if not self._accepted(rc, "reads'"):
            return
        self.refused = None
        client.subscribe(self.subscriptions)  # again after every reconnect
        self.connected.set()
        log.info("connected to %s:%s", self._ep.host, self._ep.port)

    def _on_out_connect(self, client: paho.Client, _u: object, _f: object, rc: ReasonCode,
                        _p: Properties | None) -> None:
        if not self._accepted(rc, "publishing"):
            return
        nodelay(client)
        self.out_connected.set()

    def _on_disconnect(self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode,
                       _p: Properties | None) -> None:
        self.connected.clear()
        self.connection += 1
        if rc.value != 0:
            log.warning("disconnected from the broker (%s); reconnecting; %d in the inbox, "
                        "%d waits for room so far", rc, len(self.inbox), self.inbox.waits)

    def _on_read(self, topic: str, payload: bytes, mid: int, qos: int = 1) -> None:
        self.inbox.put_threadsafe(Inbound(topic, payload, mid, qos, self.clock(),
                                          self.connection))

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        """What `ReadsClient` leaves to paho (see its `_read`)."""
        self._on_read(msg.topic, bytes(msg.payload), msg.mid, msg.qos)

    def _on_publish(self, _c: paho.Client, _u: object, mid: int, _rc: ReasonCode,
                    _p: Properties | None) -> None:
        # paho calls this holding its outgoing-message lock, which `publish` takes too:
        # taking a lock of ours here as well deadlocked two concurrent publishes (ABBA).
        # `_pending` is only touched on the event loop, where this lands after the
        # publishing coroutine registered its future. The time is taken here: the loop
        # may be busy with a group for some ms before it gets to it.
        self._loop.call_soon_threadsafe(self._published, mid, self.clock())

    # -- asyncio side ----------------------------------------------------------

    def ack(self, msgs: list[Inbound]) -> None:
        """Acknowledge, in the order received (MQTT 3.1.1 4.6, MQTT 5 4.6), on the
        connection each message came on.

        A message taken before a reconnect is not acknowledged on the new connection:
        had the broker lost the session (a restart without persistence, an expired
        session), its packet ids start again and the old id would acknowledge another,
        unread message. Where the session survived the broker sends the message again
        and dedupe absorbs that copy, which is acknowledged."""
        self.client.ack_all([m.mid for m in msgs
                             if m.qos == 1 and m.connection == self.connection])
        self.inbox.release(msgs)

    def _published(self, mid: int, at_ms: int) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(at_ms)

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0,
                ) -> Coroutine[Any, Any, int]:
        """Publish with QoS 1: the message is handed to paho before this returns (not
        when the result is first awaited), and awaiting the result waits for the
        broker's PUBACK and gives when it came (the clock's ms, read in the network
        thread), or raises TimeoutError or ConnectionError."""
        info = self.out.publish(topic, payload, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return _raise(ConnectionError(f"publish failed: {paho.error_string(info.rc)}"))
        fut: asyncio.Future[int] = self._loop.create_future()
        self._pending[info.mid] = fut
        return self._puback(info.mid, fut, timeout)

    async def _puback(self, mid: int, fut: asyncio.Future[int], timeout: float) -> int:
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(mid, None)


async def _raise(exc: BaseException) -> NoReturn:
    raise exc
