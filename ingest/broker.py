"""A broker of our own on 127.0.0.1, for the demo and the test session.

The `mosquitto` binary where installed (configured as `deploy/mosquitto.conf`
advises: queues deep enough that a slow worker loses nothing), else the
embedded Python broker amqtt in a child process. amqtt has no shared
subscriptions, speaks only MQTT 3.1.1 and keeps no queue for anonymous
sessions, so it runs in logged-in mode and the worker uses a plain
subscription there: `BrokerHandle.settings_overrides` says which.

`python -m ingest.broker PORT` runs amqtt in the foreground (the child process).
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEMO_USER = "bikewatch"  # amqtt's logged-in mode wants a user name; any password passes


@dataclass(slots=True)
class BrokerAddress:
    """Where a broker of ours listens: all another process needs to use it."""

    kind: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{DEMO_USER}:{DEMO_USER}@127.0.0.1:{self.port}"

    @property
    def shared_subscriptions(self) -> bool:
        return self.kind == "mosquitto"

    def settings_overrides(self) -> dict[str, str]:
        """Environment for a worker talking to this broker."""
        env = {"BIKEWATCH_MQTT_URL": self.url}
        if self.kind == "amqtt":
            env |= {"BIKEWATCH_SHARE_GROUP": "", "BIKEWATCH_MQTT_PROTOCOL": "3.1.1"}
        return env


@dataclass(slots=True)
class BrokerHandle(BrokerAddress):
    """A broker started by `start_broker`; `stop` ends it."""

    process: subprocess.Popen[bytes]
    workdir: tempfile.TemporaryDirectory[str]

    def address(self) -> BrokerAddress:
        """This broker's address alone, which pickles (the process does not)."""
        return BrokerAddress(self.kind, self.port)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.workdir.cleanup()


def free_port(run: int = 1) -> int:
    """A free port on 127.0.0.1, and the `run - 1` after it free too (for
    `bikewatch serve --workers N`, whose worker i serves on the port + i - 1)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            for i in range(1, run):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + i))
        except OSError:
            continue
        return port


MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
# Started as root, mosquitto drops to the user 'mosquitto', which cannot write into our
# private temporary folder: it would run without its log, silently.
user {user}
# Deep queues: a slow or restarting worker must find every read waiting (defaults: 1000, 20).
max_queued_messages 1000000
max_inflight_messages 0
log_dest file {dir}/mosquitto.log
"""


def start_broker(kind: str | None = None, port: int | None = None) -> BrokerHandle:
    """Start mosquitto (if installed, or asked for) or amqtt, and wait until it answers.

    Out of our process group, and so ours to stop (`BrokerHandle.stop`): Ctrl-C in a
    terminal signals the whole group, and the demo's broker quit at once, before the
    worker's orderly stop (the worker warned of a lost broker, its health events were
    not published, and the demo's last line said 4% of stations online where they had
    all been up)."""
    port = port or free_port()
    workdir = tempfile.TemporaryDirectory(prefix="bikewatch-broker-")
    mosquitto = shutil.which("mosquitto") or shutil.which("/usr/sbin/mosquitto")
    kind = kind or ("mosquitto" if mosquitto else "amqtt")
    if kind == "mosquitto":
        if mosquitto is None:
            raise RuntimeError("mosquitto is not installed")
        conf = Path(workdir.name, "mosquitto.conf")
        conf.write_text(MOSQUITTO_CONF.format(port=port, dir=workdir.name,
                                              user=getpass.getuser()))
        cmd = [mosquitto, "-c", str(conf)]
    else:
        cmd = [sys.executable, "-m", "ingest.broker", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    handle = BrokerHandle(kind, port, proc, workdir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            workdir.cleanup()
            raise RuntimeError(f"{kind} exited at start: {err.strip()[:300]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return handle
        time.sleep(0.05)
    handle.stop()
    raise RuntimeError(f"{kind} did not answer on 127.0.0.1:{port}")


def _run_amqtt(port: int) -> None:
    import asyncio
    import logging

    from amqtt.broker import Broker

    logging.basicConfig(level=logging.ERROR)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {
            # Logged-in mode: amqtt keeps queues only for sessions that are not anonymous.
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False},
        },
    }

    async def main() -> None:
        broker = Broker(config)
        await broker.start()
        try:
            await asyncio.Event().wait()
        finally:
            await broker.shutdown()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


if __name__ == "__main__":
    _run_amqtt(int(sys.argv[1]))
