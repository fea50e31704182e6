"""The metrics of PROTOCOL.md section 5, on an injected registry.

Counters are bumped only after a group's transaction commits, so a retried
group is never counted twice. Station up, the online ratios and the target are
computed at scrape time by `StationMetrics` from the station health tracker,
so a station that is removed from the registry disappears by itself (STYLE.md 16).
`/metrics` serves `exposition(registry, stations)`: the registry's families,
then the stations'. No tag is ever
a label: labels come only from the closed sets reason, kind, station, zone.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from alerts.engine import KINDS
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
        self.received = Counter(
            "bikewatch_received_batches", "Read payloads received; each is accepted "
            "(bikewatch_batches_total), a duplicate (bikewatch_duplicate_batches_total) or "
            "rejected (bikewatch_rejected_total)", registry=registry)
        self.intake_lag = Gauge(
            "bikewatch_intake_lag_seconds", "Age of the oldest message being processed: "
            "how far behind the worker is (it grows while the database is slow or away; "
            "0 when caught up)", registry=registry)
        self.inflight = Gauge("bikewatch_inflight_messages",
                              "Messages received and not yet acknowledged", registry=registry)
        self.alert_commit = Histogram(
            "bikewatch_alert_commit_seconds", "Read received to its alert committed: the "
            "database's share of bikewatch_alert_latency_seconds (the rest is the broker's)",
            buckets=(.001, .0025, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10),
            registry=registry)
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
        self.alert_deliveries = Counter(
            "bikewatch_alert_deliveries", "Delivery attempts by alert kind, channel (mqtt, "
            "webhook/NAME) and outcome: delivered, failed (retried later), dead (retried for "
            "webhook_max_age_s, then dead-lettered)", ["kind", "channel", "outcome"],
            registry=registry)
        self.outbox_depth = Gauge("bikewatch_outbox_depth",
                                  "Alerts not yet delivered, by channel", ["channel"],
                                  registry=registry)
        self.outbox_oldest = Gauge("bikewatch_outbox_oldest_seconds",
                                   "Age of the oldest alert not yet delivered, by channel "
                                   "(0 when none)", ["channel"], registry=registry)
        self.station_transitions = Counter(
            "bikewatch_station_transitions", "Station up/down changes stored, by zone and the "
            "state changed to", ["zone", "to"], registry=registry)
        self.missing_batches = Gauge(
            "bikewatch_missing_batches", "Batches missing from stations' seq ranges (within "
            "a boot) over the last 5 minutes, by zone: lost upstream, or still to come late",
            ["zone"], registry=registry)
        self.health_owner = Gauge(
            "bikewatch_health_owner", "1 on the worker that stores station transitions and "
            "publishes health events (registry.lease); every worker tracks and exposes the "
            "stations' state", registry=registry)
        for reason in PAYLOAD_REASONS:
            self.rejected.labels(reason.value)
        for read_reason in READ_REASONS:
            self.rejected_reads.labels(read_reason.value)
        for kind in KINDS:
            self.alerts.labels(kind)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class StationMetrics:
    """Station up, the online ratios and the target, computed from `StationHealth` when
    scraped, so a station removed from the registry disappears by itself.

    Written straight to the Prometheus text format (0.0.4) rather than through
    prometheus_client's generate_latest: at 10,000 stations that spent about
    11 us a sample, a third of a second a scrape (`bikewatch bench`); here each
    station's label set is formatted once per registry change and a sample is
    one f-string. Per station only what every station has (up, seconds since
    heard and since its last read); the outage length and the flapping flag
    only for the stations they describe.
    """

    FAMILIES = (  # name, help, labels: the order they are written in
        ("bikewatch_station_up", "1 if the station is online and heard within its timeout",
         ("station", "zone")),
        ("bikewatch_station_last_heard_seconds", "Seconds since the station was last heard "
         "(heartbeat, reads or status); since its provisioning if never", ("station", "zone")),
        ("bikewatch_station_last_read_seconds", "Seconds since the station's last read batch; "
         "since its provisioning if none", ("station", "zone")),
        ("bikewatch_station_down_seconds", "Seconds the station has been down, for stations "
         "down now", ("station", "zone", "cause")),
        ("bikewatch_station_flapping", "1 for a station changing state more often than the "
         "flapping limit; only flapping stations", ("station", "zone")),
        ("bikewatch_zone_online_ratio", "Up stations over imported stations, per zone",
         ("zone",)),
        ("bikewatch_stations_down", "Imported stations down now, by cause", ("cause",)),
        ("bikewatch_uptime_target", "The online-ratio target in force, by stage", ("stage",)),
        ("bikewatch_stations_online_ratio", "Up stations over all imported stations", ()),
        ("bikewatch_stations_online_gap", "The online ratio minus the target in force "
         "(below 0: short of the target)", ()),
    )

    def __init__(self, health: StationHealth) -> None:
        self._health = health
        self._labels: dict[tuple[str, str], str] = {}

    def _label(self, station: str, zone: str) -> str:
        text = self._labels.get((station, zone))
        if text is None:
            if len(self._labels) > 4 * len(self._health.directory) + 1000:
                self._labels.clear()  # stations removed or moved: start afresh
            text = self._labels[station, zone] = (
                f'station="{_escape(station)}",zone="{_escape(zone)}"')
        return text

    def exposition(self) -> bytes:
        now = self._health.clock()
        out: dict[str, list[str]] = {name: [] for name, _, _ in self.FAMILIES}
        up, heard, read = (out["bikewatch_station_up"],
                           out["bikewatch_station_last_heard_seconds"],
                           out["bikewatch_station_last_read_seconds"])
        down, flapping = out["bikewatch_station_down_seconds"], out["bikewatch_station_flapping"]
        zones: dict[str, list[int]] = {}
        causes = dict.fromkeys(CAUSES, 0)
        n = n_up = 0
        for station, zone, is_up, cause, since, last_heard, last_read, flaps in (
                self._health.views()):
            label = self._label(station, zone)
            up.append(f"bikewatch_station_up{{{label}}} {1 if is_up else 0}")
            heard.append(f"bikewatch_station_last_heard_seconds{{{label}}} "
                         f"{max(0, now - last_heard) / 1000}")
            read.append(f"bikewatch_station_last_read_seconds{{{label}}} "
                        f"{max(0, now - last_read) / 1000}")
            z = zones.get(zone)
            if z is None:
                z = zones[zone] = [0, 0]
            z[0] += 1
            n += 1
            if is_up:
                z[1] += 1
                n_up += 1
            else:
                down.append(f'bikewatch_station_down_seconds{{{label},cause="{cause}"}} '
                            f"{max(0, now - since) / 1000}")
                causes[cause] = causes.get(cause, 0) + 1
            if flaps:
                flapping.append(f"bikewatch_station_flapping{{{label}}} 1")
        ratio = n_up / n if n else 0.0
        target = self._health.target()
        out["bikewatch_zone_online_ratio"] = [
            f'bikewatch_zone_online_ratio{{zone="{_escape(zone)}"}} {z_up / total}'
            for zone, (total, z_up) in sorted(zones.items())]
        out["bikewatch_stations_down"] = [f'bikewatch_stations_down{{cause="{cause}"}} {count}'
                                          for cause, count in causes.items()]
        out["bikewatch_uptime_target"] = [
            f'bikewatch_uptime_target{{stage="{target.stage}"}} {target.ratio}']
        out["bikewatch_stations_online_ratio"] = [f"bikewatch_stations_online_ratio {ratio}"]
        out["bikewatch_stations_online_gap"] = [
            f"bikewatch_stations_online_gap {ratio - target.ratio}"]
        lines: list[str] = []
        for name, help_text, _ in self.FAMILIES:
            lines.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge")
            lines.extend(out[name])
        return ("\n".join(lines) + "\n").encode()


def exposition(registry: CollectorRegistry, stations: StationMetrics) -> bytes:
    """What `/metrics` serves."""
    return generate_latest(registry) + stations.exposition()
