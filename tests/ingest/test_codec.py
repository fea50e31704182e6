"""Codecs: round trips, every rejection reason and its precedence, and never an exception."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.codec import (
    HEADER,
    MAX_PAYLOAD,
    binary_tags,
    decode,
    decode_many,
    encode_binary,
    encode_json,
)
from ingest.errors import Reason, Rejected

NOW = 1_763_803_800_000
CORPUS = Path(__file__).with_name("corpus")

reads_strategy = st.lists(
    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 10_000_000),
              st.integers(-128, 0), st.integers(0, 255), st.integers(0, 0xFFFF)),
    max_size=60)


def _reason(payload: bytes, station: str = "S1") -> Reason:
    with pytest.raises(Rejected) as info:
        decode(payload, station, NOW)
    return info.value.reason


def _outcome(payload: bytes) -> str:
    """'ok', or the rejection reason; any other exception fails the test."""
    try:
        decode(payload, "S1", NOW)
    except Rejected as rej:
        return rej.reason.value
    return "ok"


def _json(**doc: object) -> bytes:
    base: dict[str, object] = {"v": 1, "boot": 1, "seq": 1, "sent_ms": NOW, "reads": []}
    base.update(doc)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


class TestRoundTrip:
    @given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), reads_strategy)
    def test_binary_batch_decodes_to_what_was_encoded(self, boot: int, seq: int,
                                                      reads: list[tuple[int, ...]]) -> None:
        base = NOW - 10_000_000
        cols = list(zip(*reads, strict=True)) if reads else [[], [], [], [], []]
        payload = encode_binary(boot, seq, base, *cols)
        b = decode(payload, "S1", NOW)
        assert (b.station, b.boot, b.seq) == ("S1", boot, seq)
        assert b.reads.tag.tolist() == list(cols[0])
        assert b.reads.ts_ms.tolist() == [base + d for d in cols[1]]
        assert b.reads.rssi.tolist() == list(cols[2])
        assert b.reads.ant.tolist() == list(cols[3]) and b.reads.flags.tolist() == list(cols[4])
        assert b.bad_tag == b.bad_value == b.skewed == 0

    @given(st.integers(0, 2**32 - 1), reads_strategy)
    def test_json_batch_decodes_to_what_was_encoded(self, seq: int,
                                                    reads: list[tuple[int, ...]]) -> None:
        cols = list(zip(*reads, strict=True)) if reads else [[], [], [], [], []]
        ts = [NOW - 10_000_000 + d for d in cols[1]]
        payload = encode_json(3, seq, NOW, cols[0], ts, cols[2], cols[3], cols[4], station="S1")
        b = decode(payload, "S1", NOW)
        assert b.reads.tag.tolist() == list(cols[0]) and b.reads.ts_ms.tolist() == ts
        assert b.reads.rssi.tolist() == list(cols[2]) and b.reads.flags.tolist() == list(cols[4])


class TestNeverRaises:
    @given(st.binary(max_size=400))
    @settings(max_examples=400)
    def test_any_bytes_decode_or_reject(self, payload: bytes) -> None:
        for p in (payload, b"BW" + payload, b"{" + payload, b'{"v":1' + payload):
            outcome = _outcome(p)
            assert outcome == "ok" or outcome in {r.value for r in Reason}

    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                        lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(st.sampled_from(
                            ["v", "boot", "seq", "sent_ms", "reads", "station", "tag", "ts_ms",
                             "rssi", "ant", "flags"]), kids, max_size=6), max_leaves=30))
    @settings(max_examples=400)
    def test_any_json_document_decodes_or_rejects(self, doc: object) -> None:
        try:
            payload = orjson.dumps(doc)
        except (TypeError, orjson.JSONEncodeError):
            return
        if _outcome(payload) == "ok":
            batch = decode(payload, "S1", NOW)
            reads = doc["reads"]  # type: ignore[index]
            assert len(batch) + batch.bad_tag + batch.bad_value == len(reads)

    def test_fuzz_corpus(self) -> None:
        files = sorted(CORPUS.iterdir())
        assert len(files) >= 20
        outcomes = set()
        for f in files:
            try:
                decode(f.read_bytes(), "S1", NOW)
                outcomes.add("ok")
            except Rejected as rej:
                outcomes.add(rej.reason.value)
        assert {"ok", "bad_json", "bad_binary", "bad_format"} <= outcomes

    def test_rejections_come_back_bare(self) -> None:
        """A rejection handed back with its traceback (or the parser's error it was
        raised from) holds, in a reference cycle, the frames and with them the whole
        group of payloads: the flood fault test's memory grew past 800 MB with it."""
        files = sorted(CORPUS.iterdir())
        out = decode_many([(f.read_bytes(), "S1", NOW) for f in files])
        rejected = [r for r in out if isinstance(r, Rejected)]
        assert {r.reason for r in rejected} >= {Reason.BAD_JSON, Reason.BAD_BINARY}
        assert all(r.__traceback__ is None and r.__context__ is None
                   and r.__cause__ is None for r in rejected)


class TestRejections:
    @pytest.mark.parametrize(("payload", "reason"), [
        (b"{" + b" " * MAX_PAYLOAD, Reason.TOO_LARGE),
        (b"[1, 2]", Reason.BAD_FORMAT),
        (b"", Reason.BAD_FORMAT),
        (b"hello", Reason.BAD_FORMAT),
        (b'  {"v": 1,', Reason.BAD_JSON),
        (b'{"v": 1, "x": "\xff"}', Reason.BAD_JSON),
        (_json(v=2), Reason.UNKNOWN_VERSION),
        (_json(v=2, boot=...), Reason.UNKNOWN_VERSION),  # precedence over missing_field
        (HEADER.pack(b"BW", 2, 0, 1, 1, NOW, 0), Reason.UNKNOWN_VERSION),
        (HEADER.pack(b"BW", 1, 1, 1, 1, NOW, 0), Reason.BAD_BINARY),
        (HEADER.pack(b"BW", 1, 0, 1, 1, NOW, 2) + b"\0" * 16, Reason.BAD_BINARY),
        (b"BW\x01", Reason.BAD_BINARY),
        (_json(seq=...), Reason.MISSING_FIELD),
        (_json(v="1"), Reason.BAD_VALUE),
        (_json(v=True), Reason.BAD_VALUE),
        (_json(boot=-1), Reason.BAD_VALUE),
        (_json(seq=2**32), Reason.BAD_VALUE),
        (_json(reads={}), Reason.BAD_VALUE),
        (_json(reads=[{}] * 10_001), Reason.TOO_MANY_READS),
        (_json(reads=[{}] * 10_001, boot="x"), Reason.BAD_VALUE),  # precedence
        (HEADER.pack(b"BW", 1, 0, 1, 1, NOW, 10_001) + b"\0" * 16 * 10_001,
         Reason.TOO_MANY_READS),
        (_json(station="S2"), Reason.STATION_MISMATCH),
    ])
    def test_reason(self, payload: bytes, reason: Reason) -> None:
        assert _reason(payload) is reason

    def test_rejection_keeps_boot_and_seq(self) -> None:
        with pytest.raises(Rejected) as info:
            decode(_json(boot=9, seq=4, station="other"), "S1", NOW)
        assert (info.value.boot, info.value.seq) == (9, 4)

    def test_bad_reads_are_dropped_alone(self) -> None:
        reads = [{"tag": "00a1b2c3", "ts_ms": NOW}, {"tag": "0x12", "ts_ms": NOW},
                 {"tag": "12345678901234567", "ts_ms": NOW}, {"tag": "ab", "ts_ms": "1"},
                 {"tag": "ab"}, {"tag": "ab", "ts_ms": NOW, "rssi": 5}, 7,
                 {"tag": "AB", "ts_ms": NOW, "ant": 255, "flags": 65535, "rssi": -128}]
        b = decode(_json(reads=reads), "S1", NOW)
        assert b.reads.tag.tolist() == [0xA1B2C3, 0xAB]
        assert (b.bad_tag, b.bad_value) == (2, 4)

    def test_binary_positive_rssi_is_a_bad_read(self) -> None:
        b = decode(encode_binary(1, 1, NOW, [1, 2], [0, 0], [-40, 5]), "S1", NOW)
        assert b.reads.tag.tolist() == [1] and b.bad_value == 1

    def test_clock_skewed_reads_take_the_receive_time(self) -> None:
        ahead = NOW + 5 * 60_000 + 1
        b = decode(encode_binary(1, 1, NOW, [1, 2], [0, ahead - NOW]), "S1", NOW)
        assert b.reads.ts_ms.tolist() == [NOW, NOW] and b.skewed == 1
        assert decode(encode_binary(1, 1, NOW, [1], [5 * 60_000]), "S1", NOW).skewed == 0


def test_decoded_columns_have_the_documented_types() -> None:
    r = decode(encode_binary(1, 1, NOW, [1], [0]), "S1", NOW).reads
    assert (r.tag.dtype, r.ts_ms.dtype, r.rssi.dtype, r.ant.dtype, r.flags.dtype) == (
        np.uint64, np.int64, np.int8, np.uint8, np.uint16)


_payloads = st.lists(st.one_of(
    st.tuples(st.just("binary"), reads_strategy),
    st.tuples(st.just("json"), reads_strategy),
    st.tuples(st.just("bytes"), st.binary(max_size=120))), max_size=12)


@given(_payloads)
@settings(max_examples=200)
def test_binary_tags_are_those_the_decoder_finds(items: list[tuple[str, object]]) -> None:
    """The express lane's look into a group (ingest.pipeline): every binary batch's tags
    with its index, in order, as decoding finds them; other payloads bring none, and
    no bytes raise."""
    payloads: list[bytes] = []
    for kind, content in items:
        if kind == "bytes":
            assert isinstance(content, bytes)
            payloads.append(content if content[:2] != b"BW" else b"x" + content)
            continue
        assert isinstance(content, list)
        tags = np.array([r[0] for r in content], dtype=np.uint64)
        if kind == "binary":
            payloads.append(encode_binary(1, len(payloads), NOW, tags, [0] * len(tags)))
        else:
            payloads.append(encode_json(1, len(payloads), NOW, tags.tolist(), [NOW] * len(tags)))
    tags, index = binary_tags(payloads)
    expected = [(i, t) for i, p in enumerate(payloads) if p[:2] == b"BW"
                for t in decode(p, "S1", NOW).reads.tag.tolist()]
    assert list(zip(index.tolist(), tags.tolist(), strict=True)) == expected


@given(st.lists(st.binary(max_size=80).map(lambda b: b"BW" + b), max_size=8))
def test_binary_tags_take_any_bytes_behind_the_magic(payloads: list[bytes]) -> None:
    tags, index = binary_tags(payloads)
    assert len(tags) == len(index)
    assert all(0 <= i < len(payloads) for i in index.tolist())
