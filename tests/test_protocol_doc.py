"""The public surface, pinned: PROTOCOL.md section 5's metrics, section 4's commands and
variables, and docs/protocol.md, which may name nothing the code lacks."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ingest.cli import build_parser
from ingest.config import Settings
from ingest.errors import Reason
from ingest.health import HealthPolicy, StationHealth
from ingest.metrics import Metrics, StationMetrics, exposition
from registry.stations import StationInfo

DOC = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()

CONTRACT_METRICS = {
    "bikewatch_reads": ("counter", set()),
    "bikewatch_rejected": ("counter", {"reason"}),
    "bikewatch_rejected_reads": ("counter", {"reason"}),
    "bikewatch_clock_skew_reads": ("counter", set()),
    "bikewatch_duplicate_batches": ("counter", set()),
    "bikewatch_unknown_station_batches": ("counter", set()),
    "bikewatch_alerts": ("counter", {"kind"}),
    "bikewatch_station_up": ("gauge", {"station", "zone"}),
    "bikewatch_stations_online_ratio": ("gauge", set()),
    "bikewatch_alert_latency_seconds": ("histogram", set()),
}


def _families() -> dict[str, tuple[str, set[str]]]:
    registry = CollectorRegistry()
    Metrics(registry)
    health = StationHealth(HealthPolicy(), lambda: 0)
    health.load({"S1": StationInfo("S1", "", None, None, "z", True, 0)}, {})
    text = exposition(registry, StationMetrics(health)).decode()  # what /metrics serves
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.endswith("_created"):
            continue  # prometheus_client's creation times of counters and histograms
        labels = {k for s in fam.samples for k in s.labels if k not in ("le",)}
        out[fam.name] = (fam.type, labels)
    return out


def _commands(parser: argparse.ArgumentParser, prefix: str = "bikewatch") -> set[str]:
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.add(f"{prefix} {name}")
                found |= _commands(sub, f"{prefix} {name}")
    return found


class TestContract:
    def test_metrics_names_types_and_labels(self) -> None:
        families = _families()
        for name, (kind, labels) in CONTRACT_METRICS.items():
            assert families[name] == (kind, labels), name

    def test_commands(self) -> None:
        commands = _commands(build_parser())
        for cmd in ("serve", "demo", "stations import", "vehicles import", "theft report",
                    "theft recover", "simulate"):
            assert f"bikewatch {cmd}" in commands

    def test_environment_variables_and_defaults(self) -> None:
        s = Settings.load(None, {})
        assert (s.mqtt_url, s.db_url, s.http, s.mqtt_root) == (
            "mqtt://127.0.0.1:1883", "sqlite+aiosqlite:///bikewatch.db", "127.0.0.1:8080",
            "bikewatch")
        s = Settings.load(None, {"BIKEWATCH_MQTT_URL": "mqtt://u:p@10.0.0.1:1884",
                                 "BIKEWATCH_DB_URL": "postgresql+asyncpg://x/y",
                                 "BIKEWATCH_HTTP": "0.0.0.0:9000",
                                 "BIKEWATCH_MQTT_ROOT": "towns/shangpan"})
        assert (s.mqtt_url, s.db_url, s.http, s.mqtt_root) == (
            "mqtt://u:p@10.0.0.1:1884", "postgresql+asyncpg://x/y", "0.0.0.0:9000",
            "towns/shangpan")


class TestDocumentNamesOnlyWhatExists:
    def test_metrics(self) -> None:
        families = _families()
        exposed = set(families) | {n + "_total" for n, (k, _) in families.items()
                                   if k == "counter"}
        named = set(re.findall(r"`(bikewatch_[a-z_]+)`", DOC))
        assert named and named <= exposed, named - exposed
        for name, (kind, _) in families.items():  # and every metric is documented
            assert (name + "_total" if kind == "counter" else name) in named, name

    def test_reasons(self) -> None:
        section = DOC[DOC.index("### Rejections"):DOC.index("## Receiving alerts")]
        rows = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
        assert set(rows) == {r.value for r in Reason} - {"bad_tag"}
        assert "`bad_tag`" in DOC

    def test_commands(self) -> None:
        commands = _commands(build_parser())
        named = {m.strip() for m in re.findall(r"`(bikewatch(?: [a-z]+)+)", DOC)}
        assert named and named <= commands, named - commands

    def test_topics(self) -> None:
        topics = set(re.findall(r"`\{root\}/([a-z{}/]+)`", DOC))
        assert topics - {"alerts/unassigned"} == {
            "stations/{station}/reads", "stations/{station}/heartbeat",
            "stations/{station}/status", "alerts/{zone}", "health/{zone}"}
        from ingest.mqtt import MqttLink  # the subscriptions the worker makes

        src = Path(__file__).parents[1].joinpath("ingest", "mqtt.py").read_text()
        for kind in ("reads", "status", "heartbeat"):
            assert f"/stations/+/{kind}" in src
        service = Path(__file__).parents[1].joinpath("ingest", "service.py").read_text()
        assert '{root}/health/{e.zone}' in service  # where health events go
        assert MqttLink

    def test_variables(self) -> None:
        names = {f"BIKEWATCH_{k.upper()}" for k in Settings.__dataclass_fields__}
        named = set(re.findall(r"`(BIKEWATCH_[A-Z_]+)`", DOC))
        assert named == names, named ^ names

    def test_http_paths(self) -> None:
        from ingest.http import build_app

        app = build_app(None, lambda: b"", Settings.load(None, {}))  # type: ignore[arg-type]
        served = {f"{m.upper()} {path}" for path, ops in app.openapi()["paths"].items()
                  for m in ops} | {"GET /openapi.json"}
        section = DOC[DOC.index("### Paths"):DOC.index("## Metrics")]
        named = {m.group(1) for m in re.finditer(
            r"^\| `((?:GET|POST|PUT|PATCH|DELETE) /[^?` ]*)", section, re.M)}
        assert named == served, named ^ served
