"""The metrics of PROTOCOL.md section 5, on an injected registry.

Counters are bumped only after a group's transaction commits, so a retried
group is never counted twice. Station up and the online ratio are computed at
scrape time by `StationCollector` from the health table, so a station that is
removed from the registry disappears by itself (STYLE.md 16). No tag is ever
a label: labels come only from the closed sets reason, kind, station, zone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest.errors import PAYLOAD_REASONS, READ_REASONS


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.reads = Counter("bikewatch_reads", "Reads accepted, each counted once",
                             registry=registry)
        self.rejected = Counter("bikewatch_rejected", "Payloads rejected whole, by reason",
                                ["reason"], registry=registry)
        self.rejected_reads = Counter("bikewatch_rejected_reads",
                                      "Reads dropped alone from a good batch, by reason",
                                      ["reason"], registry=registry)
        self.clock_skew = Counter("bikewatch_clock_skew_reads",
                                  "Reads more than 5 minutes ahead, kept at receive time",
                                  registry=registry)
        self.duplicates = Counter("bikewatch_duplicate_batches",
                                  "Batches seen before (same station, boot, seq)",
                                  registry=registry)
        self.unknown_station = Counter("bikewatch_unknown_station_batches",
                                       "Batches from stations never imported", registry=registry)
        self.alerts = Counter("bikewatch_alerts", "Alerts raised, by kind", ["kind"],
                              registry=registry)
        self.alert_latency = Histogram(
            "bikewatch_alert_latency_seconds", "Read received to alert published",
            buckets=(.001, .0025, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10),
            registry=registry)
        # Additions to the contract (docs/protocol.md, "Metrics").
        self.batches = Counter("bikewatch_batches", "Read batches accepted", registry=registry)
        self.inflight = Gauge("bikewatch_inflight_messages",
                              "Messages received and not yet acknowledged", registry=registry)
        self.group_seconds = Histogram(
            "bikewatch_group_seconds", "Time to process and commit one group of batches",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
            registry=registry)
        self.intake_waits = Counter(
            "bikewatch_intake_waits", "Times the MQTT network thread waited for room in the "
            "inbox (the broker sent more than our Receive Maximum)", registry=registry)
        self.db_retries = Counter("bikewatch_db_retries",
                                  "Group transactions retried after a database error",
                                  registry=registry)
        self.stolen_tags = Gauge("bikewatch_stolen_tags", "Open cases in the hot-path snapshot",
                                 registry=registry)
        for reason in PAYLOAD_REASONS:
            self.rejected.labels(reason.value)
        for read_reason in READ_REASONS:
            self.rejected_reads.labels(read_reason.value)
        self.alerts.labels("stolen_sighting")


StationRow = tuple[str, str, bool]  # station, zone, up


class StationCollector(Collector):
    """`bikewatch_station_up` and `bikewatch_stations_online_ratio`, read when scraped."""

    def __init__(self, rows: Callable[[], Iterable[StationRow]]) -> None:
        self._rows = rows

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("bikewatch_station_up",
                               "1 if the station is online and heard within its timeout",
                               labels=["station", "zone"])
        n = n_up = 0
        for station, zone, is_up in self._rows():
            up.add_metric([station, zone], 1.0 if is_up else 0.0)
            n += 1
            n_up += is_up
        yield up
        yield GaugeMetricFamily("bikewatch_stations_online_ratio",
                                "Up stations over all imported stations",
                                value=n_up / n if n else 0.0)
