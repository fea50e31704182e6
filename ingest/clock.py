"""Time, injected (STYLE.md 10): everything takes a `Clock`, tests pass their own."""

from __future__ import annotations

import datetime as dt
import time
import zoneinfo
from collections.abc import Callable

Clock = Callable[[], int]


def wall_ms() -> int:
    """Milliseconds since the epoch, UTC."""
    return time.time_ns() // 1_000_000


def parse_iso(text: str, tz: zoneinfo.ZoneInfo) -> int:
    """ISO 8601 to epoch ms; a time without an offset is in `tz`. ValueError if malformed."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz)
    return int(when.timestamp() * 1000)


def iso(ms: int, timespec: str = "milliseconds") -> str:
    """Epoch ms to ISO 8601 in UTC: what `parse_iso` reads back."""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec=timespec)
