"""The event loop every bikewatch process runs on: uvloop's (libuv, in C).

The worker's loop is woken for each trip a group makes to SQLite's thread, for
each burst of messages from paho's network thread, for each PUBACK and webhook
answer; asyncio's own loop spends Python on each of those wake-ups, on the core
and under the interpreter's lock that the hot path needs. In alternated 20 s
runs at 4,000 batches/s (a slow hour; the worker carries about 6,500), the
police subscriber's p99 was 53, 44 and 65 ms on uvloop against 60, 74 and 64 ms
on asyncio's loop, and p90 31, 28 and 35 against 43, 34 and 38.

The tests run on it too (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")

new_event_loop = uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on a uvloop loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
