"""`bikewatch serve --workers N`: N worker processes on one machine, kept running.

Each worker is a whole `bikewatch serve` in a process of its own (one Python
process uses one core: the GIL), with its own MQTT client id (`-1`, `-2`, ...
after the configured one) in the same shared subscription group, so the broker
splits the stations' batches between them, and its own HTTP port (the
configured one for the first, the next ones after it), so that Prometheus
scrapes each. Nothing a worker keeps in memory is needed by another (see
docs/protocol.md, "Several workers"). A worker that dies is started again,
after a pause that doubles up to a minute while it keeps dying; SIGTERM or
Ctrl-C stops them all, each finishing its in-flight batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from ingest.config import Settings

STOP_GRACE_S = 30.0
MAX_PAUSE_S = 60.0
log = logging.getLogger(__name__)


def worker_env(settings: Settings, index: int) -> dict[str, str]:
    """The settings that tell worker `index` (from 0) from the others."""
    host, port = settings.http_address()
    return {"BIKEWATCH_CLIENT_ID": f"{settings.client_id}-{index + 1}",
            "BIKEWATCH_HTTP": f"{host}:{port + index}"}


async def _keep(index: int, argv: Sequence[str], env: dict[str, str], stop: asyncio.Event,
                procs: dict[int, asyncio.subprocess.Process]) -> None:
    pause = 1.0
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ingest.cli", *argv,
                                                    env=env)
        procs[index] = proc
        started = asyncio.get_running_loop().time()
        code = await proc.wait()
        if stop.is_set():
            return
        log.warning("worker %d exited with %s; starting it again in %.0f s", index + 1, code,
                    pause)
        print(f"bikewatch: worker {index + 1} exited ({code}); starting it again",
              file=sys.stderr)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
        lived = asyncio.get_running_loop().time() - started
        pause = 1.0 if lived > MAX_PAUSE_S else min(pause * 2, MAX_PAUSE_S)


async def supervise(settings: Settings, workers: int, argv: Sequence[str],
                    stop: asyncio.Event) -> int:
    """Run `bikewatch {argv}` (a `serve` without --workers) as `workers` processes."""
    procs: dict[int, asyncio.subprocess.Process] = {}
    keepers = [asyncio.create_task(_keep(i, argv, os.environ | worker_env(settings, i), stop,
                                         procs), name=f"worker-{i + 1}")
               for i in range(workers)]
    await stop.wait()
    for proc in procs.values():
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    _, pending = await asyncio.wait(keepers, timeout=STOP_GRACE_S)
    for proc in procs.values():
        if proc.returncode is None:
            proc.kill()
    await asyncio.gather(*(p.wait() for p in procs.values()))
    for task in pending:
        task.cancel()
    return 0
