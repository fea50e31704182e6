"""Bad payloads a faulty station could send: one kind for every rejection reason.

`KINDS` walks PROTOCOL.md 2.5 in order: each whole-payload reason, then the two
single-read reasons (a good batch carrying one bad read). `make` returns the
payload and what bikewatch must count for it.
"""

from __future__ import annotations

import orjson

from ingest.codec import MAX_PAYLOAD, MAX_READS, encode_binary
from ingest.errors import Reason

# (kind, reason, counted as): "payload" in bikewatch_rejected_total,
# "read" in bikewatch_rejected_reads_total (the batch itself is accepted).
KINDS: tuple[tuple[str, Reason, str], ...] = (
    ("too_large", Reason.TOO_LARGE, "payload"),
    ("bad_format", Reason.BAD_FORMAT, "payload"),
    ("bad_json", Reason.BAD_JSON, "payload"),
    ("unknown_version", Reason.UNKNOWN_VERSION, "payload"),
    ("bad_binary", Reason.BAD_BINARY, "payload"),
    ("missing_field", Reason.MISSING_FIELD, "payload"),
    ("bad_value", Reason.BAD_VALUE, "payload"),
    ("too_many_reads", Reason.TOO_MANY_READS, "payload"),
    ("station_mismatch", Reason.STATION_MISMATCH, "payload"),
    ("read_bad_tag", Reason.BAD_TAG, "read"),
    ("read_bad_value", Reason.BAD_VALUE, "read"),
)
# Whole-payload rejects carry seq numbers from here up, so that none can be taken
# for a batch a station really sent.
BAD_SEQ_BASE = 3_000_000_000


def make(kind: str, station: str, boot: int, seq: int, now_ms: int) -> bytes:
    """The payload of `kind`. `seq` is the station's next seq for the read kinds, whose
    batch is accepted; the payload kinds are given one from BAD_SEQ_BASE up."""
    env = {"v": 1, "boot": boot, "seq": seq, "sent_ms": now_ms}
    read = {"tag": "00a10001", "ts_ms": now_ms}
    match kind:
        case "too_large":
            return b'{"v":1,"pad":"' + b"x" * MAX_PAYLOAD + b'"}'
        case "bad_format":
            return b"\x00\x01garbage from a radio module"
        case "bad_json":
            return b'{"v":1,"boot":1,"seq":' + b"\xff\xfe" + b"}"
        case "unknown_version":
            return orjson.dumps(env | {"v": 2, "reads": []})
        case "bad_binary":
            return encode_binary(boot, seq, now_ms, [1, 2], [0, 1])[:-5]
        case "missing_field":
            return orjson.dumps({"v": 1, "boot": boot, "reads": []})
        case "bad_value":
            return orjson.dumps(env | {"seq": -1, "reads": []})
        case "too_many_reads":
            return orjson.dumps(env | {"reads": [read] * (MAX_READS + 1)})
        case "station_mismatch":
            return orjson.dumps(env | {"station": f"not-{station}"[:64], "reads": []})
        case "read_bad_tag":
            return orjson.dumps(env | {"reads": [read | {"tag": "0xZZ-not-hex"}]})
        case "read_bad_value":
            return orjson.dumps(env | {"reads": [read | {"rssi": 40}]})
    raise ValueError(f"unknown kind {kind}")
