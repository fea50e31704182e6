"""One typed settings object, read at the edge (PROTOCOL.md section 4).

`Settings.load(path, environ)` reads an optional TOML file, then lets the
environment override it: every setting `name` has the variable
`BIKEWATCH_<NAME>`; the four of the contract are `BIKEWATCH_MQTT_URL`,
`BIKEWATCH_DB_URL`, `BIKEWATCH_HTTP` and `BIKEWATCH_MQTT_ROOT`. Every problem
is a `ConfigError` naming the setting and the bad value. Nothing here is read
at import time.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import socket
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ingest.errors import ConfigError

_TOPIC_LEVEL = re.compile(r"[^+#/\x00]+")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(slots=True, frozen=True)
class MqttEndpoint:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    ca_file: str | None = None  # the CA that signed the broker's certificate; None: system's

    def secure(self, client: Any) -> None:
        """Credentials and TLS on a paho client, as this endpoint says."""
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set(ca_certs=self.ca_file)


@dataclass(slots=True, frozen=True)
class WebhookReceiver:
    """A police system that takes alerts by HTTP POST (docs/protocol.md, "Webhooks")."""

    name: str
    url: str
    # Standard Webhooks secrets (`whsec_` + base64): every one signs each request, so a
    # receiver rotating its secret accepts either while both are listed.
    secrets: tuple[str, ...]
    zones: tuple[str, ...] = ("*",)  # the zones whose alerts it gets; "*" for all
    # "masked": the owner as every channel carries it (138****1234); "full": name and phone
    # whole, for a police system cleared for it, each delivery audited (registry.privacy).
    contact: str = "masked"

    def serves(self, zone: str) -> bool:
        return "*" in self.zones or zone in self.zones


@dataclass(slots=True, frozen=True)
class Settings:
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    db_url: str = "sqlite+aiosqlite:///bikewatch.db"
    http: str = "127.0.0.1:8080"
    mqtt_root: str = "bikewatch"
    # Shared-subscription group; empty for a plain subscription (one worker, or
    # a broker without $share such as the embedded amqtt).
    share_group: str = "bikewatch"
    mqtt_protocol: str = "5"          # "5" or "3.1.1" (amqtt speaks only 3.1.1)
    # mqtts:// verifies the broker against this CA file (PEM); empty: the system's CAs.
    mqtt_ca_file: str = ""
    client_id: str = "bikewatch-worker"  # "{hostname}" in it is replaced by the host's name
    # Unacknowledged QoS 1 reads the broker may send us (MQTT 5 Receive
    # Maximum): the in-flight bound of DESIGN.md decision 5, far below the
    # 65,535 message ids, and large enough that one commit covers many batches.
    receive_maximum: int = 2000
    group_messages: int = 1000        # most messages taken (and acknowledged) at once
    visit_gap_s: float = 60.0         # a visit ends after this long unheard (section 3)
    late_after_s: float = 300.0       # an alert older than this is `late`
    # Faster than this between two stations is no ride but a cloned tag (impossible_travel);
    # well above an e-bike's 25 km/h, so that station clocks a little apart do not trip it.
    impossible_speed_kmh: float = 120.0
    # Station uptime (ingest.health). A station is down once unheard for its timeout:
    # its own (stations CSV column timeout_s), else its zone's, else this fleet default.
    heartbeat_timeout_s: float = 90.0  # 3 heartbeat intervals of 30 s
    zone_timeouts: tuple[tuple[str, float], ...] = ()  # zone=seconds,...
    flap_transitions: int = 6        # more up/down changes than this in the window: flapping
    flap_window_s: float = 3600.0
    down_repeat_s: float = 3600.0    # a station still down is reported again this often
    # Availability targets, date=ratio,...; none given: 0.95 from the first station's
    # provisioning, 1.00 from a year later (the towns' plans).
    uptime_targets: tuple[tuple[str, float], ...] = ()
    dedupe_hours: float = 48.0        # contract: at least 24
    # Sightings (station visits) are deleted after this, but those of open cases.
    sighting_retention_days: float = 180.0
    # Alert webhooks: a TOML array of tables [[webhooks]], or a JSON array in the environment.
    webhooks: tuple[WebhookReceiver, ...] = ()
    webhook_timeout_s: float = 10.0   # per attempt
    webhook_max_age_s: float = 72 * 3600.0  # retried this long, then dead-lettered
    timezone: str = "UTC"             # for ISO times given without an offset

    @classmethod
    def load(cls, path: str | Path | None, environ: Mapping[str, str]) -> Settings:
        values: dict[str, Any] = {}
        if path is not None:
            try:
                values.update(tomllib.loads(Path(path).read_text(encoding="utf-8")))
            except OSError as exc:
                raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
        known = {f.name: f for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"--config {path}", f"unknown setting {key!r}")
        for name in known:
            env = environ.get(f"BIKEWATCH_{name.upper()}")
            if env is not None:
                values[name] = env
        defaults = cls()
        settings = cls(**{name: _coerce(name, raw, getattr(defaults, name))
                          for name, raw in values.items()})
        if "{hostname}" in settings.client_id:  # replicas and pods share one setting
            settings = replace(settings, client_id=settings.client_id.replace(
                "{hostname}", socket.gethostname()))
        settings.validate()
        return settings

    def validate(self) -> None:
        self.mqtt_endpoint()
        self.http_address()
        if not self.db_url.strip():
            raise ConfigError("BIKEWATCH_DB_URL", "is empty")
        levels = self.mqtt_root.split("/")
        if not all(_TOPIC_LEVEL.fullmatch(level) for level in levels):
            raise ConfigError("BIKEWATCH_MQTT_ROOT",
                              f"{self.mqtt_root!r} is not a topic prefix (no +, # or empty levels)")
        if self.share_group and not _NAME.fullmatch(self.share_group):
            raise ConfigError("BIKEWATCH_SHARE_GROUP", f"{self.share_group!r} is not a group name")
        if self.mqtt_protocol not in ("5", "3.1.1"):
            raise ConfigError("BIKEWATCH_MQTT_PROTOCOL", f"{self.mqtt_protocol!r}: use 5 or 3.1.1")
        if not 1 <= self.receive_maximum <= 30_000:  # the inbox holds twice this (ingest.mqtt)
            raise ConfigError("BIKEWATCH_RECEIVE_MAXIMUM",
                              f"{self.receive_maximum} is not in 1..30000")
        for name in ("group_messages", "visit_gap_s", "late_after_s", "impossible_speed_kmh",
                     "heartbeat_timeout_s",
                     "flap_transitions", "flap_window_s", "down_repeat_s", "webhook_timeout_s",
                     "webhook_max_age_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"BIKEWATCH_{name.upper()}", "must be positive")
        for zone, seconds in self.zone_timeouts:
            if not _NAME.fullmatch(zone) or seconds <= 0:
                raise ConfigError("BIKEWATCH_ZONE_TIMEOUTS",
                                  f"{zone}={seconds}: want zone=seconds with seconds > 0")
        self.uptime_stages()
        names = [w.name for w in self.webhooks]
        if len(names) != len(set(names)):
            raise ConfigError("BIKEWATCH_WEBHOOKS", "two webhooks have the same name")
        if self.sighting_retention_days < 1:
            raise ConfigError("BIKEWATCH_SIGHTING_RETENTION_DAYS", "must be at least 1")
        if self.dedupe_hours < 24:
            raise ConfigError("BIKEWATCH_DEDUPE_HOURS", "must be at least 24 (PROTOCOL.md 2.4)")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError("BIKEWATCH_TIMEZONE",
                              f"unknown time zone {self.timezone!r}") from None

    def mqtt_endpoint(self) -> MqttEndpoint:
        if self.mqtt_ca_file and not Path(self.mqtt_ca_file).is_file():
            raise ConfigError("BIKEWATCH_MQTT_CA_FILE", f"{self.mqtt_ca_file!r} is not a file")
        bad = ConfigError("BIKEWATCH_MQTT_URL",
                          f"{self.mqtt_url!r} is not mqtt://[user:pass@]host[:port]")
        try:
            url = urlsplit(self.mqtt_url)
            port = url.port
        except ValueError:
            raise bad from None
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname or url.path not in ("", "/"):
            raise bad
        return MqttEndpoint(url.hostname, port or (8883 if url.scheme == "mqtts" else 1883),
                            unquote(url.username) if url.username else None,
                            unquote(url.password) if url.password else None,
                            url.scheme == "mqtts", self.mqtt_ca_file or None)

    def http_address(self) -> tuple[str, int]:
        host, sep, port = self.http.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("BIKEWATCH_HTTP", f"{self.http!r} is not host:port")
        return host.strip("[]"), int(port)

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def uptime_stages(self) -> list[tuple[int, float]]:
        """The configured targets as (from_ms, ratio), oldest first; [] for the default."""
        stages = []
        for day, ratio in self.uptime_targets:
            try:
                when = dt.datetime.fromisoformat(day)
            except ValueError:
                raise ConfigError("BIKEWATCH_UPTIME_TARGETS",
                                  f"{day!r} is not an ISO 8601 date") from None
            if not 0 <= ratio <= 1:
                raise ConfigError("BIKEWATCH_UPTIME_TARGETS", f"{day}={ratio}: want 0..1")
            if when.tzinfo is None:
                when = when.replace(tzinfo=self.tz)
            stages.append((int(when.timestamp() * 1000), ratio))
        return sorted(stages)


def _coerce(name: str, raw: object, default: object) -> Any:
    setting = f"BIKEWATCH_{name.upper()}"
    if isinstance(default, bool) or isinstance(raw, bool):
        raise ConfigError(setting, f"{raw!r} is not a valid value")
    try:
        if isinstance(default, int):
            return int(raw)  # type: ignore[call-overload]
        if isinstance(default, float):
            return float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(setting, f"{raw!r} is not a number") from None
    if name == "webhooks":
        return _webhooks(setting, raw)
    if isinstance(default, tuple):
        return _pairs(setting, raw)
    if not isinstance(raw, str):
        raise ConfigError(setting, f"{raw!r} is not a string")
    return raw


def _pairs(setting: str, raw: object) -> tuple[tuple[str, float], ...]:
    """A TOML table, or `key=number,key=number` from the environment."""
    if isinstance(raw, str):
        items: list[tuple[str, object]] = []
        for part in filter(None, (p.strip() for p in raw.split(","))):
            name, sep, text = part.partition("=")
            if not sep:
                raise ConfigError(setting, f"{part!r} is not key=number")
            items.append((name.strip(), text.strip()))
    elif isinstance(raw, dict):
        items = [(str(k), v) for k, v in raw.items()]
    else:
        raise ConfigError(setting, f"{raw!r} is not a table of key = number")
    out = []
    for key, value in items:
        try:
            if isinstance(value, bool):
                raise TypeError
            out.append((key, float(value)))  # type: ignore[arg-type]  # TypeError caught
        except (TypeError, ValueError):
            raise ConfigError(setting, f"{key}={value!r}: not a number") from None
    return tuple(out)


def _webhooks(setting: str, raw: object) -> tuple[WebhookReceiver, ...]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else []
        except ValueError:
            raise ConfigError(setting, "is not a JSON array of webhooks") from None
    if not isinstance(raw, list):
        raise ConfigError(setting, "is not a list of webhooks")
    out = []
    for i, item in enumerate(raw):
        where = f"webhook {i + 1}"
        if not isinstance(item, dict) or set(item) - {"name", "url", "secrets", "zones",
                                                      "contact"}:
            raise ConfigError(setting, f"{where}: want a table of name, url, secrets, zones, "
                                       "contact")
        name, url = item.get("name"), item.get("url")
        secrets, zones = item.get("secrets"), item.get("zones", ["*"])
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(setting, f"{where}: name {name!r} breaks [A-Za-z0-9._-]{{1,64}}")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") \
                or not urlsplit(url).hostname:
            raise ConfigError(setting, f"{name}: url {url!r} is not http(s)://host/...")
        if (not isinstance(secrets, list) or not secrets
                or not all(isinstance(x, str) and _secret_ok(x) for x in secrets)):
            raise ConfigError(setting, f"{name}: secrets must be a list of whsec_<base64>")
        if (not isinstance(zones, list) or not zones
                or not all(isinstance(z, str) and (z == "*" or _NAME.fullmatch(z))
                           for z in zones)):
            raise ConfigError(setting, f"{name}: zones must be a list of zone ids or \"*\"")
        contact = item.get("contact", "masked")
        if contact not in ("masked", "full"):
            raise ConfigError(setting, f"{name}: contact is \"masked\" or \"full\"")
        out.append(WebhookReceiver(name, url, tuple(secrets), tuple(zones), contact))
    return tuple(out)


def _secret_ok(secret: str) -> bool:
    if not secret.startswith("whsec_"):
        return False
    try:
        return bool(base64.b64decode(secret[6:] + "==", validate=False))
    except ValueError:
        return False
