"""The reads client's own packet reading (`ReadAhead.whole_packet`) and PUBLISH parsing
(`ReadsClient._read`) against paho's.

Packets are handed to the client as paho's packet reader would hand them over, with no
socket: what the fast path delivers must be what paho's own decoding gives, and what it
does not take must go paho's way. The path through a real broker is in
test_mqtt_link.py."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt._packet import decode_publish
from paho.mqtt.client import MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.mqtt import ReadAhead, ReadsClient

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
QOS1 = 0x32  # PUBLISH, QoS 1


class _Seen:
    """A reads client that notes which way each packet went."""

    def __init__(self, protocol: MQTTProtocolVersion) -> None:
        self.fast: list[tuple[str, bytes, int]] = []
        self.paho: list[MQTTMessage] = []
        self.client = ReadsClient(CallbackAPIVersion.VERSION2, protocol=protocol,
                                   manual_ack=True)
        self.client.on_read = lambda topic, payload, mid: self.fast.append((topic, payload, mid))
        self.client.on_message = lambda _c, _u, msg: self.paho.append(msg)

    def handle(self, command: int, packet: bytes) -> None:
        self.client._in_packet = {"command": command, "packet": bytearray(packet)}
        self.client._handle_publish()


def _publish(topic: bytes, mid: int, payload: bytes, props: bytes | None) -> bytes:
    return (struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid)
            + (props if props is not None else b"") + payload)


# MQTT 5 section 1.5.4: no NUL, no U+FEFF, no surrogates
_MQTT_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufeff")
_PROPS = st.builds(
    lambda expiry, ctype, users: _properties(expiry, ctype, users),
    st.none() | st.integers(0, 2**32 - 1), st.none() | st.text(_MQTT_TEXT, max_size=40),
    st.lists(st.tuples(st.text(_MQTT_TEXT, max_size=10), st.text(_MQTT_TEXT, max_size=200)),
             max_size=8))


def _properties(expiry: int | None, ctype: str | None, users: list[tuple[str, str]]) -> bytes:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    if ctype is not None:
        props.ContentType = ctype
    if users:
        props.UserProperty = users
    return bytes(props.pack())  # type: ignore[no-untyped-call]


@given(topic=st.text(min_size=1, max_size=80), mid=st.integers(1, 65535),
       payload=st.binary(max_size=2000), props=_PROPS, v5=st.booleans())
def test_any_valid_publish_is_read_as_paho_reads_it(
        topic: str, mid: int, payload: bytes, props: bytes, v5: bool) -> None:
    protocol = V5 if v5 else V311
    packet = _publish(topic.encode(), mid, payload, props if v5 else None)
    seen = _Seen(protocol)
    seen.handle(QOS1, packet)
    theirs = decode_publish(QOS1, bytearray(packet), protocol)
    assert seen.fast == [(theirs.topic.decode(), theirs.payload, theirs.mid)]
    assert seen.fast == [(topic, payload, mid)] and not seen.paho
    assert type(seen.fast[0][1]) is bytes  # a copy: paho reuses nothing, but we hold it


@given(packet=st.binary(max_size=64), command=st.sampled_from([0x30, 0x32, 0x33, 0x3A]),
       v5=st.booleans())
def test_any_bytes_are_read_as_paho_reads_them_or_left_to_paho(
        packet: bytes, command: int, v5: bool) -> None:
    """Whatever the bytes: the fast path takes only a QoS 1 packet that paho decodes to
    the same topic, payload and packet id (for MQTT 5 its properties' contents are not
    checked, only their length); everything else goes to paho, which delivers it or
    raises as it always has."""
    protocol = V5 if v5 else V311
    seen = _Seen(protocol)
    try:
        seen.handle(command, packet)
    except Exception:  # paho's own reaction to a malformed packet
        assert not seen.fast
        return
    if seen.fast:
        assert command & 0x06 == 0x02 and not seen.paho
        topic, payload, mid = seen.fast[0]
        if not v5:
            theirs = decode_publish(command, bytearray(packet), protocol)
            assert (topic.encode(), payload, mid) == (theirs.topic, theirs.payload, theirs.mid)
        assert mid > 0 and topic and packet.endswith(payload)


@pytest.mark.parametrize("packet", [
    _publish(b"", 7, b"x", b"\x00"),           # empty topic: a topic alias would send this
    _publish(b"\xff\xfe", 7, b"x", b"\x00"),   # not UTF-8
    _publish(b"a/b", 0, b"x", b"\x00"),        # packet id 0 is not one
    _publish(b"a/b", 7, b"", b"\x05\x01"),     # properties longer than the packet
    b"\x00",
])
def test_what_the_fast_path_does_not_take_goes_to_paho(packet: bytes) -> None:
    seen = _Seen(V5)
    try:
        seen.handle(QOS1, packet)
    except (MalformedPacket, struct.error):  # paho's own refusal of the last two
        assert packet in (_publish(b"a/b", 7, b"", b"\x05\x01"), b"\x00")
    else:
        assert len(seen.paho) == 1
    assert not seen.fast


def test_qos_0_goes_to_paho() -> None:
    seen = _Seen(V311)
    seen.handle(0x30, struct.pack("!H", 3) + b"a/b" + b"payload")
    assert not seen.fast and [(m.topic, m.payload) for m in seen.paho] == [("a/b", b"payload")]


def _remaining_length(n: int) -> bytes:
    """MQTT's Variable Byte Integer (section 1.5.5)."""
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytewise(ahead: ReadAhead) -> tuple[int, bytes] | None:
    """One packet read as paho reads it: its first byte, its length a byte at a time,
    then the rest; None at the end of the stream."""
    first = ahead.recv(1)
    if not first:
        return None
    length, shift = 0, 0
    while True:
        byte = ahead.recv(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    body = b""
    while len(body) < length:
        body += ahead.recv(length - len(body))
    return first[0], body


@given(packets=st.lists(st.tuples(st.integers(0x10, 0xFF), st.integers(0, 70_000)),
                        min_size=1, max_size=12),
       cuts=st.lists(st.integers(1, 90_000), max_size=12))
def test_whole_packets_are_the_stream_as_paho_would_read_it(
        packets: list[tuple[int, int]], cuts: list[int]) -> None:
    """Packets of any size (lengths of 1 to 3 bytes, over the 64 KiB read-ahead), sent in
    any pieces: each is taken whole when all of it is held, and read as paho reads it
    when it is not, and together they are the packets sent, in order."""
    sent = [(command, bytes([size % 251]) * size) for command, size in packets]
    stream = b"".join(bytes([c]) + _remaining_length(len(b)) + b for c, b in sent)
    a, b = socket.socketpair()
    try:
        writer = threading.Thread(target=_write_in_pieces, args=(a, stream, cuts))
        writer.start()
        ahead = ReadAhead(b)
        got: list[tuple[int, bytes]] = []
        while True:
            held = ahead.whole_packet()
            if held is not None:
                ahead.skip_to(held[2])
                got.append((held[0], bytes(held[1])))
                continue
            packet = _bytewise(ahead)
            if packet is None:
                break
            got.append(packet)
        writer.join()
        assert got == sent
    finally:
        b.close()


def _write_in_pieces(sock: socket.socket, data: bytes, cuts: list[int]) -> None:
    at = 0
    for cut in [*cuts, len(data)]:
        sock.sendall(data[at:at + cut])
        at += cut
    sock.close()


def test_a_malformed_length_is_left_to_paho() -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(b"\x30\x01x" + b"\x30" + b"\xff" * 5 + b"x" * 100)
        ahead = ReadAhead(b)
        assert _bytewise(ahead) == (0x30, b"x")  # and the rest is held now
        assert ahead.pending() == 106
        assert ahead.whole_packet() is None  # five length bytes: paho refuses it itself
        assert ahead.pending() == 106
    finally:
        a.close()
        b.close()


def test_one_turn_of_the_network_loop_reads_every_packet_held() -> None:
    """paho reads one packet a turn of its loop; the reads client reads on while its
    read-ahead holds bytes, a packet held whole in one step, a packet in pieces paho's
    way. So 300 PUBLISHes sent at once (more than one read-ahead chunk) take a few
    turns, not 300, and arrive whole and in order."""
    a, b = socket.socketpair()
    b.setblocking(False)
    seen = _Seen(V5)
    seen.client._sock = ReadAhead(b)
    try:
        sent = [(f"town/stations/S-{i % 7}/reads", bytes([i % 251]) * (300 + i), i + 1)
                for i in range(300)]
        stream = b"".join(
            bytes([QOS1]) + _remaining_length(len(body)) + body
            for body in (_publish(t.encode(), mid, p, b"\x00") for t, p, mid in sent))
        assert len(stream) > ReadAhead.CHUNK
        a.sendall(stream)
        turns = 0
        while len(seen.fast) < len(sent) and turns < 20:
            seen.client.loop_read()
            turns += 1
        assert seen.fast == sent and not seen.paho
        assert turns <= 4  # one a read-ahead chunk, give or take the one in pieces
    finally:
        a.close()
        b.close()
