"""Driving a town in (scaled) real time: `bikewatch simulate`, and the demo's traffic."""

from __future__ import annotations

import asyncio
import contextlib
import time

from ingest.clock import wall_ms
from simulator.publisher import StationPublisher
from simulator.town import Town

HEARTBEAT_S = 30.0


async def drive(town: Town, pub: StationPublisher, stop: asyncio.Event, *,
                duration_s: float = 0, speedup: float = 1.0, tick_s: float = 1.0) -> None:
    """Publish the town's traffic until `stop` or `duration_s` (wall seconds) runs out.

    Each tick is `tick_s` of simulated time, published every `tick_s / speedup`
    wall seconds, with timestamps on the simulated clock (which starts now).
    """
    for sid in town.station_ids:
        pub.status(sid, "online")
    start_wall, sim_ms = time.monotonic(), wall_ms()
    next_beat = 0.0
    ticks = 0
    try:
        while not stop.is_set():
            if duration_s and time.monotonic() - start_wall >= duration_s:
                break
            sim_ms += int(tick_s * 1000)
            ticks += 1
            for sid, (tags, ts, rssi) in town.step(tick_s, sim_ms).items():
                await asyncio.to_thread(pub.reads, sid, tags, ts, rssi, sim_ms)
            if ticks * tick_s >= next_beat:
                for sid in town.station_ids:
                    pub.heartbeat(sid, sim_ms)
                next_beat += HEARTBEAT_S
            delay = start_wall + ticks * tick_s / speedup - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
    finally:
        await asyncio.to_thread(pub.flush, 10.0)
