"""The operators' side in deploy/: promtool passes, a real Prometheus scraping a running
bikewatch answers every dashboard query and every alert rule with data, and the Grafana
dashboard and provisioning files have the shape Grafana 10 loads."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from ingest.broker import BrokerHandle, free_port
from ingest.clock import wall_ms
from registry.cases import report_theft
from registry.db import open_database
from registry.imports import import_stations, import_vehicles
from tests.conftest import tool
from tests.helpers import bearer, publisher, running_worker, settings_for, until

DEPLOY = Path(__file__).parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "bikewatch.json"
# Grafana's own variables, as Grafana would fill them in for a short range.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "1s"}

STATIONS = """id,name,lat,lon,zone
SP-0040,Reads and heartbeats,28.72,121.54,shangpan
SP-0042,Never reported,28.73,121.55,shangpan
SP-0050,Heartbeats but no reads,28.74,121.56,xiaozhi
SP-0060,Flapping,28.75,121.57,xiaozhi
"""
VEHICLES = "tag,plate,owner_name,owner_phone,brand,color\n00a1b2c3,P,N,1,Yadea,white\n"
STOLEN = 0xA1B2C3


def _tool(name: str) -> str:
    return tool(name, "prometheus; .ci/run installs it")


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def _fill(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


class TestPromtool:
    def test_config_and_rules_pass(self, tmp_path: Path) -> None:
        promtool = _tool("promtool")
        shutil.copytree(DEPLOY / "prometheus", tmp_path, dirs_exist_ok=True)
        (tmp_path / "bikewatch.token").write_text("bw_the-ops-token")  # the operator's
        for args in (["check", "config", str(tmp_path / "prometheus.yml")],
                     ["check", "rules", str(RULES)]):
            proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_the_rules_the_operators_asked_for(self) -> None:
        names = {r["alert"] for r in _rules()}
        assert names == {"BikewatchFleetBelowTarget", "BikewatchStationDown",
                         "BikewatchStationFlapping", "BikewatchStationUpNoReads",
                         "BikewatchIngestRejecting", "BikewatchBatchesMissing"}
        fleet = next(r for r in _rules() if r["alert"] == "BikewatchFleetBelowTarget")
        assert fleet["for"] == "5m"


class TestGrafanaDashboard:
    """Grafana 10 (schema 38 and later) loads a dashboard with these properties."""

    def test_dashboard_shape(self) -> None:
        d = json.loads(DASHBOARD.read_text())
        assert d["schemaVersion"] >= 38 and d["uid"] and len(d["uid"]) <= 40 and d["title"]
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        for p in d["panels"]:
            assert p["type"] in {"timeseries", "table", "stat", "bargauge", "gauge"}, p["title"]
            g = p["gridPos"]
            assert all(isinstance(g[k], int) for k in "xywh") and g["x"] + g["w"] <= 24
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            refs = [t["refId"] for t in p["targets"]]
            assert refs and len(refs) == len(set(refs))
            for t in p["targets"]:
                assert t["expr"].strip() and t["datasource"] == p["datasource"]

    def test_the_panels_the_operators_asked_for(self) -> None:
        exprs = " ".join(e for _, e in _dashboard_queries())
        for metric in ("bikewatch_stations_online_ratio", "bikewatch_uptime_target",
                       "bikewatch_station_down_seconds", "bikewatch_zone_online_ratio",
                       "bikewatch_reads_total", "bikewatch_rejected_total",
                       "bikewatch_alert_latency_seconds_bucket", "bikewatch_alerts_total"):
            assert metric in exprs, metric
        table = next(p for p in json.loads(DASHBOARD.read_text())["panels"]
                     if p["title"] == "Stations down now")
        assert table["type"] == "table"

    def test_provisioning(self) -> None:
        prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/bikewatch.yml")
                              .read_text())
        assert prov["apiVersion"] == 1 and prov["providers"][0]["type"] == "file"
        ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/bikewatch.yml")
                            .read_text())
        assert ds["datasources"][0]["type"] == "prometheus"


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """Starts a real Prometheus on loopback scraping the given /metrics every second."""
    binary = _tool("prometheus")
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str, token: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        (tmp_path / "bikewatch.token").write_text(token)
        shipped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        job = shipped["scrape_configs"][0] | {"static_configs": [{"targets": [target]}]}
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)], "scrape_configs": [job]}))
        procs.append(subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb")))
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


async def _query(http: httpx.AsyncClient, expr: str) -> list[Any]:
    r = (await http.get("/api/v1/query", params={"query": expr})).json()
    assert r["status"] == "success", (expr, r)
    return list(r["data"]["result"])


@pytest.mark.broker
async def test_every_panel_and_rule_has_data_in_a_real_prometheus(
        broker: BrokerHandle, sqlite_url: str, prometheus_for: Any) -> None:
    settings = settings_for(broker, sqlite_url, BIKEWATCH_FLAP_TRANSITIONS="3")
    engine = await open_database(sqlite_url)
    now = wall_ms()
    await import_stations(engine, STATIONS, now - 2 * 3_600_000)  # provisioned 2 h ago
    await import_vehicles(engine, VEHICLES)
    await report_theft(engine, STOLEN, "LH-OPS-1", now - 600_000, now)
    await engine.dispose()
    pub = publisher(settings)
    root = settings.mqtt_root
    try:
        async with running_worker(settings) as worker:
            for sid in ("SP-0040", "SP-0050"):  # up from before the first scrape
                pub.status(sid, "online")
                pub.heartbeat(sid, wall_ms())
            assert await until(lambda: worker.health.online_ratio() == 0.5)
            ops = await bearer(settings.db_url, "ops")
            base = prometheus_for(settings.http, ops["authorization"].removeprefix("Bearer "))
            async with httpx.AsyncClient(base_url=base, timeout=5) as http:
                async def scraped() -> bool:
                    try:
                        return bool(await _query(http, 'up{job="bikewatch"} == 1'))
                    except (httpx.HTTPError, AssertionError, json.JSONDecodeError):
                        return False

                deadline = time.monotonic() + 30
                while not await scraped():
                    assert time.monotonic() < deadline, "Prometheus never scraped bikewatch"
                    await asyncio.sleep(0.5)
                for _ in range(4):  # 8 changes, more than the flapping limit of 3
                    pub.status("SP-0060", "online")
                    await asyncio.sleep(0.05)
                    pub.status("SP-0060", "offline")
                    await asyncio.sleep(0.05)
                for second in range(6):  # traffic the rates can see, a stolen bike in it
                    t = wall_ms()
                    pub.reads("SP-0040", np.array([STOLEN, 0x99 + second], np.uint64),
                              np.array([t, t]), np.array([-50, -60]), t)
                    pub.raw(f"{root}/stations/SP-0040/reads", b"[not a batch]")
                    pub.seq["SP-0040"] += 1  # a batch lost upstream: a gap in seq
                    await asyncio.sleep(1)
                    await worker._gaps()
                assert worker.registry.get_sample_value(
                    "bikewatch_alerts_total", {"kind": "stolen_sighting"}) == 1
                queries = [*_dashboard_queries(),
                           *((f"rule {r['alert']}", r["expr"]) for r in _rules())]
                empty = list(queries)
                deadline = time.monotonic() + 30
                while empty and time.monotonic() < deadline:
                    empty = [(what, expr) for what, expr in empty
                             if not await _query(http, _fill(expr))]
                    if empty:
                        await asyncio.sleep(1)
                assert not empty, f"no data for {empty}"
                rules = (await http.get("/api/v1/rules")).json()["data"]["groups"]
                states = {r["name"]: (r["health"], r["state"]) for g in rules
                          for r in g["rules"]}
                assert all(health == "ok" for health, _ in states.values()), states
                assert {s for _, s in states.values()} <= {"pending", "firing"}, states
                assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base)
    finally:
        pub.close()
