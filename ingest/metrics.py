"""The metrics of PROTOCOL.md section 5, on an injected registry.

Counters are bumped only after a group's transaction commits, so a retried
group is never counted twice. Station up, the online ratios and the target are
computed at scrape time by `StationCollector` from the station health tracker,
so a station that is removed from the registry disappears by itself (STYLE.md 16). No tag is ever
a label: labels come only from the closed sets reason, kind, station, zone.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest.errors import PAYLOAD_REASONS, READ_REASONS
from ingest.health import CAUSES, StationHealth


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
        self.station_transitions = Counter(
            "bikewatch_station_transitions", "Station up/down changes stored, by zone and the "
            "state changed to", ["zone", "to"], registry=registry)
        for reason in PAYLOAD_REASONS:
            self.rejected.labels(reason.value)
        for read_reason in READ_REASONS:
            self.rejected_reads.labels(read_reason.value)
        self.alerts.labels("stolen_sighting")


class StationCollector(Collector):
    """Station up, the online ratios and the target, read from `StationHealth` when scraped,
    so that a station removed from the registry disappears by itself. Per station only
    what every station has (up, seconds since heard and since its last read); the
    outage length and the flapping flag only for the stations they describe."""

    def __init__(self, health: StationHealth) -> None:
        self._health = health

    def collect(self) -> Iterable[Metric]:
        now = self._health.clock()
        labels = ["station", "zone"]
        up = GaugeMetricFamily("bikewatch_station_up",
                               "1 if the station is online and heard within its timeout",
                               labels=labels)
        heard = GaugeMetricFamily("bikewatch_station_last_heard_seconds",
                                  "Seconds since the station was last heard (heartbeat, reads or "
                                  "status); since its provisioning if never", labels=labels)
        read = GaugeMetricFamily("bikewatch_station_last_read_seconds",
                                 "Seconds since the station's last read batch; since its "
                                 "provisioning if none", labels=labels)
        down = GaugeMetricFamily("bikewatch_station_down_seconds",
                                 "Seconds the station has been down, for stations down now",
                                 labels=[*labels, "cause"])
        flapping = GaugeMetricFamily("bikewatch_station_flapping",
                                     "1 for a station changing state more often than the "
                                     "flapping limit; only flapping stations", labels=labels)
        zones: dict[str, list[int]] = {}
        causes = dict.fromkeys(CAUSES, 0)
        n = n_up = 0
        for v in self._health.views():
            key = [v.station, v.zone]
            up.add_metric(key, 1.0 if v.up else 0.0)
            heard.add_metric(key, max(0, now - v.last_heard_ms) / 1000)
            read.add_metric(key, max(0, now - v.last_read_ms) / 1000)
            z = zones.setdefault(v.zone, [0, 0])
            z[0] += 1
            n += 1
            if v.up:
                z[1] += 1
                n_up += 1
            else:
                down.add_metric([*key, v.cause], max(0, now - v.since_ms) / 1000)
                causes[v.cause] = causes.get(v.cause, 0) + 1
            if v.flapping:
                flapping.add_metric(key, 1.0)
        ratio = n_up / n if n else 0.0
        target = self._health.target()
        zone_ratio = GaugeMetricFamily("bikewatch_zone_online_ratio",
                                       "Up stations over imported stations, per zone",
                                       labels=["zone"])
        for zone, (total, zone_up) in sorted(zones.items()):
            zone_ratio.add_metric([zone], zone_up / total)
        by_cause = GaugeMetricFamily("bikewatch_stations_down",
                                     "Imported stations down now, by cause", labels=["cause"])
        for cause, count in causes.items():
            by_cause.add_metric([cause], count)
        target_family = GaugeMetricFamily(
            "bikewatch_uptime_target", "The online-ratio target in force, by stage",
            labels=["stage"])
        target_family.add_metric([str(target.stage)], target.ratio)
        yield from (up, heard, read, down, flapping, zone_ratio, by_cause, target_family)
        yield GaugeMetricFamily("bikewatch_stations_online_ratio",
                                "Up stations over all imported stations", value=ratio)
        yield GaugeMetricFamily("bikewatch_stations_online_gap",
                                "The online ratio minus the target in force (below 0: short "
                                "of the target)", value=ratio - target.ratio)
