"""Station health at city scale: 10,000 stations heartbeating every 30 s.

Two figures, each beside a baseline from the same run:
- CPU per heartbeat of the health tracker (heartbeats, and its once-a-second tick
  that finds silent stations, shared out over the heartbeats), against the least a
  tracker must do: one dict store per heartbeat;
- the time to render `/metrics` for all stations, against prometheus_client
  rendering plain labelled gauges with as many series.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from ingest.health import OFFLINE, UP, HealthPolicy, StationHealth
from ingest.metrics import Metrics, StationMetrics, exposition
from registry.stations import StationInfo
from simulator.report import Report

HEARTBEAT_S = 30
T0 = 1_763_800_000_000


class _Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def _town(n: int, clock: _Clock) -> tuple[StationHealth, list[str]]:
    ids = [f"ST-{i:05d}" for i in range(n)]
    health = StationHealth(HealthPolicy(), clock)
    health.load({sid: StationInfo(sid, sid, None, None, f"zone-{i % 40:02d}", True, T0)
                 for i, sid in enumerate(ids)}, {})
    for sid in ids:
        health.status(sid, UP, T0)
    health.take_pending()
    return health, ids


def bench_heartbeats(n: int, periods: int) -> tuple[float, float]:
    """ns of CPU per heartbeat: (tracker, dict baseline)."""
    clock = _Clock()
    health, ids = _town(n, clock)
    rng = np.random.default_rng(3)
    offsets = rng.integers(0, HEARTBEAT_S * 1000, n)  # stations are not in step
    order = np.argsort(offsets)
    schedule = [(ids[i], int(offsets[i])) for i in order.tolist()]
    last: dict[str, int] = {}

    def run(tracker: bool) -> float:
        start = time.process_time()
        for period in range(periods):
            base = T0 + (period + 1) * HEARTBEAT_S * 1000
            k = 0
            for second in range(HEARTBEAT_S):
                until = (second + 1) * 1000
                while k < n and schedule[k][1] < until:
                    sid, off = schedule[k]
                    if tracker:
                        health.heard(sid, base + off)
                    else:
                        last[sid] = base + off
                    k += 1
                if tracker:
                    clock.now = base + until
                    health.tick()
                    health.take_pending()
                    health.take_events()
        return (time.process_time() - start) / (n * periods) * 1e9

    return run(True), run(False)


def bench_scrape(n: int, repeats: int) -> tuple[float, float, int]:
    """ms to render /metrics for n stations: (bikewatch, plain gauge baseline, bytes)."""
    clock = _Clock()
    health, ids = _town(n, clock)
    clock.now = T0 + 60_000
    for sid in ids[: n // 50]:  # 2% down, a few flapping
        health.status(sid, OFFLINE, clock.now)
    registry = CollectorRegistry()
    Metrics(registry)
    stations = StationMetrics(health)
    plain = CollectorRegistry()
    gauges = [Gauge(f"plain_{k}", "baseline", ["station", "zone"], registry=plain)
              for k in range(3)]
    for i, sid in enumerate(ids):
        for g in gauges:
            g.labels(sid, f"zone-{i % 40:02d}").set(1)

    def timed(render: Callable[[], bytes]) -> tuple[float, int]:
        samples, size = [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            size = len(render())
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1000, size

    ours, size = timed(lambda: exposition(registry, stations))
    base, _ = timed(lambda: generate_latest(plain))
    return ours, base, size


def bench_health(quick: bool, report: Report) -> None:
    n = 2_000 if quick else 10_000
    print(f"\n== station health, {n:,} stations heartbeating every {HEARTBEAT_S} s ==")
    ours, base = bench_heartbeats(n, 2 if quick else 10)
    print(f"CPU per heartbeat: tracker {ours:,.0f} ns, dict-store baseline {base:,.0f} ns "
          f"({ours / base:.1f}x); {n / HEARTBEAT_S * ours / 1e6:.2f} ms of CPU a second "
          f"for the town")
    report.add("station health", f"CPU per heartbeat, {n:,} stations", ours, "ns", base,
               "a dict store")
    scrape, plain, size = bench_scrape(n, 3 if quick else 7)
    print(f"/metrics render: {scrape:,.0f} ms ({size / 1e6:.1f} MB); prometheus_client "
          f"rendering plain gauges, 3 series a station: {plain:,.0f} ms "
          f"({plain / scrape:.1f}x slower); target under 200 ms")
    report.add("station health", f"/metrics render, {n:,} stations", scrape, "ms", plain,
               "prometheus_client")
