"""Read-batch codecs: JSON (PROTOCOL.md 2.1) and binary (2.2) into one `ReadBatch`.

`decode` either returns a batch or raises `Rejected` with the first reason of
the 2.5 table that applies; it never raises anything else, whatever the bytes
(a property the hypothesis tests hold it to). `encode_json` and
`encode_binary` are what the simulator and the tests publish with.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Any, TypeGuard, cast

import numpy as np
import orjson

from ingest.batch import I64, U64, ReadBatch, Reads
from ingest.errors import Reason, Rejected
from registry.tags import format_tag, is_tag_text

MAX_PAYLOAD = 1 << 20  # 1 MiB
MAX_READS = 10_000
SKEW_LIMIT_MS = 5 * 60 * 1000  # reads further ahead of our clock than this are skewed

HEADER = struct.Struct("<2sBBIIQI")  # magic, version, reserved, boot, seq, base_ms, count
BINARY_MAGIC = b"BW"  # what a binary payload begins with; anything else is read as JSON
RECORD = np.dtype([("tag", "<u8"), ("dt_ms", "<u4"), ("rssi", "i1"), ("ant", "u1"),
                   ("flags", "<u2")])
assert HEADER.size == 24
_COUNT_AT = HEADER.size - 4  # the header's last field, the number of records
assert RECORD.itemsize == 16

_U32 = (1 << 32) - 1
_I63 = (1 << 63) - 1
_WHITESPACE = b" \t\r\n"
_REQUIRED = ("v", "boot", "seq", "sent_ms", "reads")
_TAG_LINES = re.compile(r"(?:[0-9A-Fa-f]{1,16}\n)*")  # tags joined by newlines, one regex pass
_NOT_A_READ: dict[str, object] = {"tag": "0"}  # a list item that is no object: a bad_value read


def decode(payload: bytes, station: str, now_ms: int) -> ReadBatch:
    """Decode one payload published on `{root}/stations/{station}/reads`."""
    batch = decode_many([(payload, station, now_ms)])[0]
    if isinstance(batch, Rejected):
        raise batch
    return batch


def decode_many(items: Sequence[tuple[bytes, str, int]]) -> list[ReadBatch | Rejected]:
    """Decode (payload, station, receive time) items; one batch or rejection each.

    Binary payloads are checked one by one at the header (struct, no numpy),
    then all their records become arrays in one pass: numpy costs a few
    microseconds per call whatever the size, so one call per group instead of
    one per batch is what makes 50-read batches cheap.
    """
    out: list[ReadBatch | Rejected | None] = []
    binary: list[tuple[int, str, int, int, int, int, int]] = []
    for payload, station, now_ms in items:
        try:
            if len(payload) > MAX_PAYLOAD:
                raise Rejected(Reason.TOO_LARGE, f"{len(payload)} bytes, limit {MAX_PAYLOAD}")
            if payload[:2] == BINARY_MAGIC:
                boot, seq, base_ms, count = _binary_header(payload)
                binary.append((len(out), station, boot, seq, base_ms, count, now_ms))
                out.append(None)  # filled in below, with the other binary payloads
            elif payload.lstrip(_WHITESPACE)[:1] == b"{":
                out.append(_decode_json(payload, station, now_ms))
            else:
                raise Rejected(Reason.BAD_FORMAT, f"starts with {payload[:8]!r}")
        except Rejected as rej:
            # Kept without its traceback, nor the parser's error it was raised from:
            # their frames hold the parsed document, and the caller's frames the
            # whole group of payloads, in a cycle with `out` that only a full garbage
            # collection frees. Measured under a flood of malformed payloads: RSS in
            # a sawtooth up to 2.9 GB.
            rej.__traceback__ = rej.__context__ = rej.__cause__ = None
            out.append(rej)
    if binary:
        bodies = [items[i][0] for i, *_ in binary]
        for i, batch in zip((b[0] for b in binary), _binary_columns(binary, bodies), strict=True):
            out[i] = batch
    return [b for b in out if b is not None]


def binary_tags(payloads: Sequence[bytes]) -> tuple[U64, I64]:
    """The tags in the binary payloads among `payloads`, and the index of each one's
    payload: who is in a group, known before it is decoded (the pipeline's express
    lane), for a fraction of the cost. Only the magic and the length are checked;
    JSON payloads, and binary ones whose length does not fit their count, are skipped."""
    index: list[int] = []
    counts: list[int] = []
    bodies: list[bytes] = []
    for i, p in enumerate(payloads):
        if p[:2] == BINARY_MAGIC and len(p) >= HEADER.size:
            count = int.from_bytes(p[_COUNT_AT:HEADER.size], "little")
            if len(p) == HEADER.size + RECORD.itemsize * count:
                index.append(i)
                counts.append(count)
                bodies.append(p[HEADER.size:])
    if not bodies:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    tags = np.frombuffer(b"".join(bodies), dtype=RECORD)["tag"]
    return tags, np.repeat(np.array(index, dtype=np.int64), counts)


def _binary_header(payload: bytes) -> tuple[int, int, int, int]:
    """(boot, seq, base_ms, count) of a binary payload, or the reason it is rejected."""
    if len(payload) < HEADER.size:
        if len(payload) > 2 and payload[2] != 1:
            raise Rejected(Reason.UNKNOWN_VERSION, f"binary version {payload[2]}")
        raise Rejected(Reason.BAD_BINARY, f"{len(payload)} bytes, shorter than the header")
    _, version, reserved, boot, seq, base_ms, count = HEADER.unpack_from(payload)
    if version != 1:
        raise Rejected(Reason.UNKNOWN_VERSION, f"binary version {version}", boot=boot, seq=seq)
    if reserved != 0 or len(payload) != HEADER.size + RECORD.itemsize * count:
        raise Rejected(Reason.BAD_BINARY,
                       f"length {len(payload)} for count {count}, reserved {reserved}",
                       boot=boot, seq=seq)
    if base_ms > _I63 - _U32:
        raise Rejected(Reason.BAD_VALUE, f"base_ms {base_ms} out of range", boot=boot, seq=seq)
    if count > MAX_READS:
        raise Rejected(Reason.TOO_MANY_READS, f"{count} reads", boot=boot, seq=seq)
    return boot, seq, base_ms, count


def _binary_columns(meta: list[tuple[int, str, int, int, int, int, int]],
                    payloads: list[bytes]) -> list[ReadBatch]:
    """The records of several checked binary payloads, as arrays built in one pass."""
    n = len(meta)
    counts = np.array([m[5] for m in meta], dtype=np.int64)
    rec = np.frombuffer(b"".join(p[HEADER.size:] for p in payloads), dtype=RECORD)
    batch_of = np.repeat(np.arange(n), counts)
    ts = rec["dt_ms"].astype(np.int64) + np.array([m[4] for m in meta], dtype=np.int64)[batch_of]
    tag, rssi, ant, flags = rec["tag"], rec["rssi"], rec["ant"], rec["flags"]
    bad_per = np.zeros(n, dtype=np.int64)
    if len(rssi) and rssi.max() > 0:  # int8 covers -128..127; only positives are out of range
        bad = rssi > 0
        bad_per = np.bincount(batch_of[bad], minlength=n)
        keep = ~bad
        tag, ts, rssi, ant, flags = tag[keep], ts[keep], rssi[keep], ant[keep], flags[keep]
        batch_of = batch_of[keep]
        counts = counts - bad_per
    ts, ahead = _unskew(ts, np.array([m[6] for m in meta], dtype=np.int64)[batch_of])
    skew_per = (np.bincount(batch_of[ahead], minlength=n) if ahead is not None
                else np.zeros(n, dtype=np.int64))
    # The batches are spans of the group's columns (ingest.batch.gather), contiguous
    # copies: the record fields are strided views of a read-only buffer.
    reads = Reads(np.ascontiguousarray(tag), ts, np.ascontiguousarray(rssi),
                  np.ascontiguousarray(ant), np.ascontiguousarray(flags))
    ends = np.cumsum(counts).tolist()
    return [ReadBatch(m[1], m[2], m[3], m[4], reads, a, b, bad_value=bv, skewed=sk,
                      binary=True)
            for m, a, b, bv, sk in zip(meta, [0, *ends[:-1]], ends, bad_per.tolist(),
                                       skew_per.tolist(), strict=True)]


def _decode_json(payload: bytes, station: str, now_ms: int) -> ReadBatch:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Rejected(Reason.BAD_JSON, str(exc)[:120]) from None
    if not isinstance(doc, dict):  # e.g. '{"a":1} [' is caught above; this is belt and braces
        raise Rejected(Reason.BAD_JSON, "not an object")
    v = doc.get("v")
    boot, seq = doc.get("boot"), doc.get("seq")
    ids = {"boot": boot if _is_int(boot) else None, "seq": seq if _is_int(seq) else None}
    if _is_int(v) and v != 1:
        raise Rejected(Reason.UNKNOWN_VERSION, f"v = {v}", **ids)
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise Rejected(Reason.MISSING_FIELD, f"missing {', '.join(missing)}", **ids)
    reads, sent_ms, named = doc["reads"], doc["sent_ms"], doc.get("station", station)
    if not _is_int(v):
        raise Rejected(Reason.BAD_VALUE, f"v = {v!r}", **ids)
    for name, value, hi in (("boot", boot, _U32), ("seq", seq, _U32), ("sent_ms", sent_ms, _I63)):
        if not (_is_int(value) and 0 <= value <= hi):
            raise Rejected(Reason.BAD_VALUE, f"{name} = {str(value)[:40]}", **ids)
    if not isinstance(reads, list):
        raise Rejected(Reason.BAD_VALUE, "reads is not a list", **ids)
    if not isinstance(named, str):
        raise Rejected(Reason.BAD_VALUE, "station is not a string", **ids)
    if len(reads) > MAX_READS:
        raise Rejected(Reason.TOO_MANY_READS, f"{len(reads)} reads", **ids)
    if named != station:
        raise Rejected(Reason.STATION_MISMATCH, f"payload names {named[:64]!r}", **ids)
    return _json_reads(reads, station, cast(int, boot), cast(int, seq), sent_ms, now_ms)


def _json_reads(reads: list[Any], station: str, boot: int, seq: int, sent_ms: int,
                now_ms: int) -> ReadBatch:
    fast = _json_columns_if_all_good(reads)
    if fast is not None:
        tag, ts, rssi, ant, flags = fast
        ts, ahead = _unskew(ts, now_ms)
        return ReadBatch.of(station, boot, seq, sent_ms, Reads(tag, ts, rssi, ant, flags),
                            skewed=_count(ahead))
    # Some read is bad: check each one, keep the good ones.
    objs = [r if type(r) is dict else _NOT_A_READ for r in reads]
    tags = [r.get("tag") for r in objs]
    tag_ok = np.fromiter((is_tag_text(t) for t in tags), dtype=np.bool_, count=len(objs))
    ts_raw = [r.get("ts_ms") for r in objs]
    rssi_raw = [r.get("rssi", 0) for r in objs]
    ant_raw = [r.get("ant", 0) for r in objs]
    flags_raw = [r.get("flags", 0) for r in objs]
    value_ok = np.fromiter(
        (_is_int(t) and 0 <= t <= _I63 and _is_int(r) and -128 <= r <= 0
         and _is_int(a) and 0 <= a <= 255 and _is_int(f) and 0 <= f <= 0xFFFF
         for t, r, a, f in zip(ts_raw, rssi_raw, ant_raw, flags_raw, strict=True)),
        dtype=np.bool_, count=len(objs))
    bad_tag = int(np.count_nonzero(~tag_ok))
    good = tag_ok & value_ok
    bad_value = int(np.count_nonzero(tag_ok & ~value_ok))
    keep = np.flatnonzero(good).tolist() if bad_tag or bad_value else range(len(objs))
    tag = np.array([int(cast(str, tags[i]), 16) for i in keep], dtype=np.uint64)
    ts = np.array([ts_raw[i] for i in keep], dtype=np.int64)
    ts, ahead = _unskew(ts, now_ms)
    skewed = _count(ahead)
    return ReadBatch.of(
        station, boot, seq, sent_ms, Reads(
            tag, ts, np.array([rssi_raw[i] for i in keep], dtype=np.int8),
            np.array([ant_raw[i] for i in keep], dtype=np.uint8),
            np.array([flags_raw[i] for i in keep], dtype=np.uint16)),
        bad_tag=bad_tag, bad_value=bad_value, skewed=skewed)


def _json_columns_if_all_good(reads: list[Any]) -> tuple[Any, Any, Any, Any, Any] | None:
    """The columns of a batch whose every read is good, checked a column at a time in C
    (comprehensions, one regex over all tags, numpy range checks); None if any is not."""
    try:
        tags = [r["tag"] for r in reads]
        ts = [r["ts_ms"] for r in reads]
        rssi = [r.get("rssi", 0) for r in reads]
        ant = [r.get("ant", 0) for r in reads]
        flags = [r.get("flags", 0) for r in reads]
    except (TypeError, KeyError, AttributeError):  # a read that is no object, or lacks a field
        return None
    if not reads:
        empty = np.empty(0, dtype=np.int64)
        return (empty.astype(np.uint64), empty, empty.astype(np.int8), empty.astype(np.uint8),
                empty.astype(np.uint16))
    if {type(t) for t in tags} != {str}:
        return None
    joined = "\n".join(tags) + "\n"
    if joined.count("\n") != len(tags) or not _TAG_LINES.fullmatch(joined):
        return None
    for column in (ts, rssi, ant, flags):
        if {type(v) for v in column} != {int}:  # bool, float, str, None: not an integer
            return None
    try:
        ts_a = np.array(ts, dtype=np.int64)
        small = np.array([rssi, ant, flags], dtype=np.int64)
    except OverflowError:
        return None
    if (ts_a.min() < 0 or small[0].min() < -128 or small[0].max() > 0 or small[1].min() < 0
            or small[1].max() > 255 or small[2].min() < 0 or small[2].max() > 0xFFFF):
        return None
    tag = np.array([int(t, 16) for t in tags], dtype=np.uint64)
    return (tag, ts_a, small[0].astype(np.int8), small[1].astype(np.uint8),
            small[2].astype(np.uint16))


def _is_int(x: object) -> TypeGuard[int]:
    return type(x) is int  # bool is an int subclass; JSON true is not a number


def _count(mask: np.ndarray[Any, Any] | None) -> int:
    return 0 if mask is None else int(np.count_nonzero(mask))


def _unskew(ts: np.ndarray[Any, np.dtype[np.int64]],
            now_ms: int | np.ndarray[Any, np.dtype[np.int64]],
            ) -> tuple[np.ndarray[Any, np.dtype[np.int64]], np.ndarray[Any, Any] | None]:
    """Reads more than 5 minutes ahead of the receive time take the receive time
    (PROTOCOL.md 2.5); `now_ms` is one time or one per read. Returns the times and
    the mask of reads replaced (None when there were none)."""
    limit = now_ms + SKEW_LIMIT_MS
    if not len(ts) or ts.max() <= np.min(limit):
        return ts, None
    ahead = ts > limit
    if not ahead.any():
        return ts, None
    return np.where(ahead, now_ms, ts), ahead


# -- encoding: what stations send (the simulator and the tests use these) --

def encode_binary(boot: int, seq: int, base_ms: int, tags: Sequence[int] | np.ndarray[Any, Any],
                  dt_ms: Sequence[int] | np.ndarray[Any, Any],
                  rssi: Sequence[int] | np.ndarray[Any, Any] | None = None,
                  ant: Sequence[int] | np.ndarray[Any, Any] | None = None,
                  flags: Sequence[int] | np.ndarray[Any, Any] | None = None) -> bytes:
    n = len(tags)
    rec = np.zeros(n, dtype=RECORD)
    rec["tag"] = tags
    rec["dt_ms"] = dt_ms
    if rssi is not None:
        rec["rssi"] = rssi
    if ant is not None:
        rec["ant"] = ant
    if flags is not None:
        rec["flags"] = flags
    return HEADER.pack(BINARY_MAGIC, 1, 0, boot, seq, base_ms, n) + rec.tobytes()


def encode_json(boot: int, seq: int, sent_ms: int, tags: Sequence[int],
                ts_ms: Sequence[int], rssi: Sequence[int] | None = None,
                ant: Sequence[int] | None = None, flags: Sequence[int] | None = None,
                station: str | None = None) -> bytes:
    reads: list[dict[str, object]] = []
    for i, (t, ts) in enumerate(zip(tags, ts_ms, strict=True)):
        read: dict[str, object] = {"tag": format_tag(int(t)), "ts_ms": int(ts)}
        if rssi is not None and rssi[i] != 0:
            read["rssi"] = int(rssi[i])
        if ant is not None:
            read["ant"] = int(ant[i])
        if flags is not None:
            read["flags"] = int(flags[i])
        reads.append(read)
    doc: dict[str, object] = {"v": 1, "boot": boot, "seq": seq, "sent_ms": sent_ms,
                              "reads": reads}
    if station is not None:
        doc["station"] = station
    return orjson.dumps(doc)
