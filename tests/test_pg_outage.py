"""PostgreSQL stopped mid-run and started again: a PostgreSQL of the test's own on a free
port (initdb, pg_ctl), a worker against it; while the database is down the worker
commits nothing and so acknowledges nothing, the broker keeps the reads, and when the
database is back the worker (never restarted) stores every read once."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.broker import BrokerHandle, free_port
from simulator.bench_workers import answering, metric_totals
from tests.conftest import tool, unavailable
from tests.helpers import FAULT_SCALE, accounted, fault_run, stored_by_now

pytestmark = pytest.mark.broker
READS = 25
OUTAGE_S = 30.0 if FAULT_SCALE >= 10 else 10.0  # the 30 s at full size


def _as_postgres(argv: list[str]) -> list[str]:
    """initdb and pg_ctl refuse to run as root: as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class OwnPostgres:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bikewatch-pg-"))
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.pg_ctl = tool("pg_ctl", "postgresql")
        self.port = free_port()
        if os.geteuid() == 0:
            pg = pwd.getpwnam("postgres")
            os.chown(self.dir, pg.pw_uid, pg.pw_gid)
        subprocess.run(_as_postgres([tool("initdb", "postgresql"), "-D", str(self.data),
                                     "-A", "trust", "-U", "postgres"]),
                       check=True, capture_output=True)
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_postgres([self.pg_ctl, "-D", str(self.data), "-w", *args]),
                       check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._ctl("-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
                  "-l", str(self.dir / "log"), "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def remove(self) -> None:
        subprocess.run(_as_postgres([self.pg_ctl, "-D", str(self.data), "-m",
                                     "immediate", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    pg = OwnPostgres()
    pg.start()
    yield pg
    pg.remove()


@pytest.mark.timeout(300)
async def test_postgresql_stopped_mid_run_and_started_again_loses_nothing(
        broker: BrokerHandle, own_postgres: OwnPostgres) -> None:
    if broker.kind != "mosquitto":  # amqtt 0.12 drops queued QoS 1 messages under load
        unavailable(f"this fault test needs mosquitto; the session runs {broker.kind}")
    per_phase = int(500 * min(FAULT_SCALE, 10))  # 375,000 reads at full size
    run = await fault_run(broker.settings_overrides(), own_postgres.url, "pgout", 5)
    log_path = own_postgres.dir / "worker.log"
    log = await asyncio.to_thread(log_path.open, "wb")
    worker = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "ingest.cli", "-v", "serve"], env=run.env,
        stdout=log, stderr=log)
    try:
        assert await asyncio.to_thread(answering, [run.http], 30)
        await asyncio.sleep(1.5)
        run.pub.connect()
        await asyncio.to_thread(run.send, per_phase)
        await asyncio.to_thread(own_postgres.stop)
        stopped = time.monotonic()
        await asyncio.to_thread(run.send, per_phase)  # the broker keeps these for the worker
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
        await asyncio.to_thread(own_postgres.start)
        await asyncio.to_thread(run.send, per_phase)
        batches, reads = await stored_by_now(own_postgres.url, run.sent * READS)
        m = await asyncio.to_thread(metric_totals, [run.http], run.ops)
        print(f"sent {run.sent} batches / {run.sent * READS} reads, {per_phase} of them while "
              f"PostgreSQL was down for {OUTAGE_S:.0f} s; stored {batches} batches / {reads} "
              f"reads; received {accounted(m)[0]:.0f} = {accounted(m)[1]:.0f} stored + "
              f"duplicate + rejected")
        if (batches, reads) != (run.sent, run.sent * READS) or worker.poll() is not None:
            print(log_path.read_text()[-5000:])  # the worker's own account of it
        assert (batches, reads) == (run.sent, run.sent * READS)
        assert worker.poll() is None  # it recovered without a restart
        assert accounted(m)[0] == accounted(m)[1] >= run.sent
    finally:
        run.pub.close()
        worker.terminate()
        await asyncio.to_thread(worker.wait, 30)
        log.close()
