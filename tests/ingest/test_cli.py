"""The command line as scripts use it: exit codes 0/1/2, one-line errors, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.broker import BrokerHandle, free_port
from ingest.config import Settings
from simulator.bench_workers import answering


def bw(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = os.environ | (env or {})
    return subprocess.run([sys.executable, "-m", "ingest.cli", *args], capture_output=True,
                          text=True, env=full, cwd=cwd, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) >= 1
    for w in words:
        assert w in proc.stderr


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"BIKEWATCH_DB_URL": f"sqlite+aiosqlite:///{tmp_path / 'bw.db'}"}


class TestRegistryCommands:
    def test_import_report_recover(self, tmp_path: Path, env: dict[str, str]) -> None:
        (tmp_path / "s.csv").write_text("id,name,lat,lon,zone\nSP-1,A,28.7,121.5,z1\n"
                                        "bad id,B,1,1,z\n")
        (tmp_path / "v.csv").write_text("tag,plate,owner_name,owner_phone,brand,color\n"
                                        "00a1b2c3,P,N,1,B,C\n")
        p = bw("stations", "import", str(tmp_path / "s.csv"), env=env)
        assert_clean_error(p, 1, "s.csv:3: bad station id")
        assert "1 added" in p.stdout
        again = bw("stations", "import", str(tmp_path / "s.csv"), env=env)
        assert "0 added, 0 updated, 1 unchanged" in again.stdout
        assert bw("vehicles", "import", str(tmp_path / "v.csv"), env=env).returncode == 0
        ok = bw("theft", "report", "--tag", "00A1B2C3", "--case", "LH-1",
                "--stolen-at", "2026-11-22T03:10", env=env)
        assert ok.returncode == 0 and "LH-1 opened" in ok.stdout
        assert_clean_error(bw("theft", "report", "--tag", "ffff", "--case", "LH-2", env=env),
                           1, "not registered")
        assert bw("theft", "recover", "--case", "LH-1", env=env).returncode == 0
        assert_clean_error(bw("theft", "recover", "--case", "LH-9", env=env), 1, "unknown case")
        assert bw("trajectory", "--tag", "00a1b2c3", env=env).returncode == 0
        assert bw("rejects", env=env).stdout.strip() == "no rejects"
        assert bw("deliveries", "list", "--state", "dead", env=env).stdout.strip() == (
            "no deliveries")
        assert "0 dead-lettered deliveries queued again" in bw("deliveries", "retry",
                                                                env=env).stdout

    def test_registration_report(self, tmp_path: Path, env: dict[str, str]) -> None:
        (tmp_path / "v.csv").write_text("tag,plate,owner_name,owner_phone,brand,color,"
                                        "community\n00a1b2c3,P,N,1,B,C,east\n")
        assert bw("vehicles", "import", str(tmp_path / "v.csv"), env=env).returncode == 0
        p = bw("report", "registration", "--format", "csv", env=env)
        assert p.stdout.splitlines() == ["community,registered,heard,heard_ratio,unknown_tags",
                                         "east,1,0,0.000000,0"]
        assert_clean_error(bw("report", "registration", "--days", "0", env=env), 2, "--days")

    def test_tokens_created_listed_revoked(self, env: dict[str, str]) -> None:
        made = bw("token", "create", "--role", "police", "--name", "patrol east",
                  "--zone", "east", env=env)
        assert made.returncode == 0, made.stderr
        secret = made.stdout.strip()
        assert secret.startswith("bw_") and len(secret) > 40
        listed = bw("token", "list", env=env).stdout
        assert "patrol east" in listed and "east" in listed and secret not in listed
        assert_clean_error(bw("token", "create", "--role", "police", "--name", "patrol east",
                              env=env), 1, "exists")
        assert_clean_error(bw("token", "create", "--role", "ops", "--name", "o", "--zone",
                              "east", env=env), 1, "only a police token")
        assert_clean_error(bw("token", "create", "--role", "boss", "--name", "b", env=env),
                           2, "--role")
        assert "revoked" in bw("token", "revoke", "patrol east", env=env).stdout
        assert "already revoked" in bw("token", "revoke", "patrol east", env=env).stdout
        assert_clean_error(bw("token", "revoke", "nobody", env=env), 1, "no token")

    @pytest.mark.parametrize("args", [
        ("theft", "report", "--tag", "0x12", "--case", "C"),
        ("theft", "report", "--tag", "12345678901234567", "--case", "C"),
        ("theft", "report", "--tag", "ab", "--case", "C", "--stolen-at", "yesterday"),
        ("stations", "import", "/nonexistent.csv"),
        ("frobnicate",),
        (),
    ])
    def test_bad_usage_exits_2(self, args: tuple[str, ...], env: dict[str, str]) -> None:
        assert_clean_error(bw(*args, env=env), 2)


class TestUptimeReport:
    """`bikewatch report uptime` over the staged history of tests/registry/test_availability."""

    WINDOW = ("--from", "2025-11-22T00:00", "--to", "2025-11-22T10:00")

    @pytest.fixture
    async def staged(self, env: dict[str, str]) -> dict[str, str]:
        from registry.db import open_database
        from tests.registry.test_availability import HISTORY, _stage

        engine = await open_database(env["BIKEWATCH_DB_URL"])
        await _stage(engine, HISTORY)
        await engine.dispose()
        return env

    def test_json_figures(self, staged: dict[str, str]) -> None:
        import json

        p = bw("report", "uptime", *self.WINDOW, "--format", "json", env=staged)
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout)
        assert r["fleet"] == {"stations": 3, "availability": 0.55, "gap": -0.4,
                              "meets_target": False}
        assert r["target"]["stage"] == 1 and r["target"]["ratio"] == 0.95
        assert [(s["station"], s["downtime_s"], s["outages"]) for s in r["below_target"]] == [
            ("C", 32_400, 1), ("B", 3_600, 1), ("A", 3_600, 1)]
        assert {z["zone"]: z["availability"] for z in r["zones"]} == {"z1": 0.85, "z2": 0.1}
        assert len(r["series"]["points"]) == 10

    def test_csv_and_table(self, staged: dict[str, str]) -> None:
        rows = bw("report", "uptime", *self.WINDOW, "--format", "csv", env=staged).stdout
        lines = rows.splitlines()
        assert lines[1].startswith("fleet,,,3,0.550000,0.95,-0.400000")
        assert "station,C,z2,1,0.100000,0.95,-0.850000,32400.000,1,32400.000,1,0" in lines
        zone = bw("report", "uptime", *self.WINDOW, "--zone", "z1", env=staged)
        assert zone.returncode == 0
        assert "Fleet: 85.000% over 2 stations" in zone.stdout and "BELOW target" in zone.stdout
        assert "Stations below target, worst first" in zone.stdout and "01:00:00" in zone.stdout

    def test_the_target_from_configuration(self, staged: dict[str, str]) -> None:
        import json

        env = staged | {"BIKEWATCH_UPTIME_TARGETS": "2025-01-01=0.5,2026-06-01=1"}
        r = json.loads(bw("report", "uptime", *self.WINDOW, "--format", "json", env=env).stdout)
        assert (r["target"]["stage"], r["fleet"]["gap"], r["fleet"]["meets_target"]) == (
            1, 0.05, True)

    def test_refusals(self, staged: dict[str, str]) -> None:
        assert_clean_error(bw("report", "uptime", "--from", "2025-11-23", "--to", "2025-11-22",
                              env=staged), 2, "is not before")
        assert_clean_error(bw("report", "uptime", "--zone", "nowhere", env=staged), 1,
                           "no station of zone")
        assert_clean_error(bw("report", "uptime", "--format", "xml", env=staged), 2)
        assert_clean_error(bw("report", "uptime", env=staged | {
            "BIKEWATCH_UPTIME_TARGETS": "someday=0.9"}), 2, "BIKEWATCH_UPTIME_TARGETS")


class TestConfiguration:
    @pytest.mark.parametrize(("var", "value"), [
        ("BIKEWATCH_MQTT_URL", "http://x"), ("BIKEWATCH_HTTP", "8080"),
        ("BIKEWATCH_DB_URL", "mysql://x/y"), ("BIKEWATCH_MQTT_ROOT", "a/+/b"),
        ("BIKEWATCH_RECEIVE_MAXIMUM", "30001"), ("BIKEWATCH_TIMEZONE", "Mars/Base"),
        ("BIKEWATCH_MQTT_CA_FILE", "/nonexistent/ca.crt"),
        ("BIKEWATCH_SIGHTING_RETENTION_DAYS", "0.5"),
    ])
    def test_bad_setting_is_one_line_naming_it(self, var: str, value: str,
                                               env: dict[str, str]) -> None:
        p = bw("serve", env=env | {var: value})
        assert_clean_error(p, 2, var)
        assert len(p.stderr.strip().splitlines()) == 1

    def test_client_id_per_host(self) -> None:
        s = Settings.load(None, {"BIKEWATCH_CLIENT_ID": "bikewatch-{hostname}"})
        assert s.client_id == f"bikewatch-{socket.gethostname()}"

    def test_unreachable_database(self) -> None:
        p = bw("serve", env={"BIKEWATCH_DB_URL": "postgresql+asyncpg://x@127.0.0.1:1/db"})
        assert_clean_error(p, 2, "BIKEWATCH_DB_URL")

    def test_unreachable_broker(self, env: dict[str, str]) -> None:
        p = bw("serve", env=env | {"BIKEWATCH_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}",
                                   "BIKEWATCH_HTTP": f"127.0.0.1:{free_port()}"})
        assert_clean_error(p, 2, "BIKEWATCH_MQTT_URL", "cannot connect")

    def test_toml_file_and_environment_override(self, tmp_path: Path,
                                                env: dict[str, str]) -> None:
        cfg = tmp_path / "bw.toml"
        cfg.write_text('mqtt_root = "a/b"\nvisit_gap_s = "x"\n')
        assert_clean_error(bw("--config", str(cfg), "serve", env=env), 2, "VISIT_GAP_S")
        cfg.write_text('nonsense = 1\n')
        assert_clean_error(bw("--config", str(cfg), "serve", env=env), 2, "nonsense")


@pytest.mark.broker
def test_serve_stops_cleanly_on_sigterm(broker: BrokerHandle, env: dict[str, str]) -> None:
    import signal
    import time

    http = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest.cli", "serve"], stderr=subprocess.PIPE, text=True,
        env=os.environ | env | broker.settings_overrides() | {
            "BIKEWATCH_HTTP": f"127.0.0.1:{http}", "BIKEWATCH_CLIENT_ID": "sigterm"})
    # Serving: the signal handlers are in place by then. A fixed 3 s wait raced the
    # interpreter's start-up and imports, which took longer than that in a slow hour,
    # and SIGTERM's default action ended the process (-15).
    assert answering([http], 60) and proc.poll() is None, (
        proc.stderr.read() if proc.stderr else "")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.monotonic() - started < 10
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
