"""Reads/s and CPU per read of `bikewatch serve --workers N`, for N = 1 and 2.

The workers are the real command in processes of their own, fed at full rate by
the load generator through the broker's shared subscription; reads are summed
from each worker's `/metrics` and CPU from the processes' own counters, over
the same seconds. On a 2-core machine the broker, the publisher and the
database share the cores with the workers, so the second worker shows how
much of the load one process could not take, not a cluster's scaling.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable

import psutil
from prometheus_client.parser import text_string_to_metric_families

from ingest.broker import BrokerAddress, free_port
from ingest.clock import wall_ms
from registry.db import open_database
from registry.tokens import create_token
from simulator.report import Report

StartPublisher = Callable[[BrokerAddress, str, float], "subprocess.Popen[str]"]


def _get(url: str, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """(status, body) of a GET; raises OSError (urllib's errors are ones) for a refused
    connection, a timeout or a status of 400 and up."""
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=timeout) as answer:
        return answer.status, answer.read().decode()


def metric_totals(ports: list[int], headers: dict[str, str]) -> dict[str, float]:
    """Every sample of the workers' /metrics, summed by name over labels and workers."""
    total: dict[str, float] = {}
    for port in ports:
        _, text = _get(f"http://127.0.0.1:{port}/metrics", headers, 5)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                total[s.name] = total.get(s.name, 0.0) + s.value
    return total


def _reads(ports: list[int], headers: dict[str, str]) -> float:
    return metric_totals(ports, headers).get("bikewatch_reads_total", 0.0)


def _cpu(procs: list[psutil.Process]) -> float:
    return float(sum(p.cpu_times().user + p.cpu_times().system for p in procs))


def answering(ports: list[int], timeout: float = 30) -> bool:
    """Every port's /healthz answers 200 within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(_get(f"http://127.0.0.1:{p}/healthz", {}, 2)[0] == 200 for p in ports):
                return True
        except OSError:  # urllib.error.URLError, HTTPError and socket timeouts among them
            pass
        time.sleep(0.3)
    return False


async def _run(broker: BrokerAddress, workers: int, seconds: float, db_url: str,
               start_publisher: StartPublisher) -> tuple[float, float]:
    """reads/s and CPU µs per read of `workers` workers."""
    root = f"benchn{uuid.uuid4().hex[:6]}"
    port = free_port(workers)
    engine = await open_database(db_url)
    try:
        token = await create_token(engine, "ops", f"bench-{root}", wall_ms())
    finally:
        await engine.dispose()
    headers = {"authorization": f"Bearer {token}"}
    env = os.environ | broker.settings_overrides() | {
        "BIKEWATCH_DB_URL": db_url, "BIKEWATCH_MQTT_ROOT": root,
        "BIKEWATCH_CLIENT_ID": f"benchn-{root}", "BIKEWATCH_HTTP": f"127.0.0.1:{port}"}
    ports = [port + i for i in range(workers)]
    sup = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "ingest.cli", "serve", "--workers", str(workers)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pub = None
    try:
        if not await asyncio.to_thread(answering, ports):
            raise RuntimeError(f"{workers} workers did not start")
        await asyncio.sleep(1.0)
        procs = psutil.Process(sup.pid).children() if workers > 1 else [psutil.Process(sup.pid)]
        pub = start_publisher(broker, root, seconds + 3)
        await asyncio.sleep(1.5)  # warm up
        r0, c0, t0 = await asyncio.to_thread(_reads, ports, headers), _cpu(procs), time.monotonic()
        await asyncio.sleep(seconds)
        r1, c1, t1 = await asyncio.to_thread(_reads, ports, headers), _cpu(procs), time.monotonic()
        return (r1 - r0) / (t1 - t0), (c1 - c0) / max(r1 - r0, 1) * 1e6
    finally:
        if pub is not None:
            await asyncio.to_thread(pub.wait)
        sup.terminate()
        await asyncio.to_thread(sup.wait, 45)


async def bench_workers(broker: BrokerAddress, seconds: float, db_url: str, report: Report,
                        start_publisher: StartPublisher) -> None:
    print(f"\n== bikewatch serve --workers N, fed at full rate, database {db_url} ==")
    figures = {}
    for n in (1, 2):
        rate, cpu = await _run(broker, n, seconds, db_url, start_publisher)
        figures[n] = (rate, cpu)
        print(f"{n} worker{'s' if n > 1 else ' '}: {rate:>10,.0f} reads/s, "
              f"{cpu:.2f} µs CPU per read (workers only)")
    report.add("workers", "2 workers, reads/s", figures[2][0], "reads/s", figures[1][0],
               "1 worker")
    report.add("workers", "2 workers, CPU per read", figures[2][1], "µs", figures[1][1],
               "1 worker")
