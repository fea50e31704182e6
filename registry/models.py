"""The database schema, SQLAlchemy 2 declarative. Alembic migrations in
`registry/migrations` create exactly this; a test checks they agree.

Tags are stored as signed BIGINT with the tag's 64 bits (see `registry.tags`).
Times are integer milliseconds since the epoch, UTC, as on the wire.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Zone(Base):
    """A police zone: where alerts go (`{root}/alerts/{zone}`) and what a zone-limited
    police token sees. Created by the station import when first named."""

    __tablename__ = "zones"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")


class Community(Base):
    """A residential community: the unit of the registration-coverage figure."""

    __tablename__ = "communities"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")


class Station(Base):
    __tablename__ = "stations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    lat: Mapped[float | None] = mapped_column(Float)
    lon: Mapped[float | None] = mapped_column(Float)
    zone: Mapped[str] = mapped_column(String(64), default="unassigned")
    # False for a station heard from but never imported (PROTOCOL.md section 1).
    imported: Mapped[bool] = mapped_column(Boolean, default=True)
    imported_ms: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str | None] = mapped_column(String(16))  # last retained status payload
    status_ms: Mapped[int | None] = mapped_column(BigInteger)
    last_heard_ms: Mapped[int | None] = mapped_column(BigInteger)
    last_read_ms: Mapped[int | None] = mapped_column(BigInteger)  # last read batch
    # Heard-within timeout of this station; null: its zone's, else the fleet default.
    timeout_s: Mapped[float | None] = mapped_column(Float)
    community: Mapped[str | None] = mapped_column(String(64), ForeignKey("communities.id"))
    installed_ms: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (
        CheckConstraint("lat IS NULL OR (lat >= -90 AND lat <= 90)", name="lat"),
        CheckConstraint("lon IS NULL OR (lon >= -180 AND lon <= 180)", name="lon"),
    )


class StationTransition(Base):
    """Every up/down change of an imported station, appended, never rewritten: the
    availability history (`registry.availability`). The first row of a station is
    its provisioning (down, cause `never`, at its import time)."""

    __tablename__ = "station_transitions"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    station: Mapped[str] = mapped_column(String(64))
    at_ms: Mapped[int] = mapped_column(BigInteger)
    up: Mapped[bool] = mapped_column(Boolean)
    cause: Mapped[str] = mapped_column(String(16))  # online | never | offline | silent
    __table_args__ = (Index("ix_station_transitions_station_at", "station", "at_ms"),
                      Index("ix_station_transitions_at", "at_ms"))


class Owner(Base):
    """A vehicle's owner: personal data, shown unmasked only to police and clerks, and
    every such read audited (`registry.privacy`)."""

    __tablename__ = "owners"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    phone: Mapped[str] = mapped_column(String(40), default="")
    phone_key: Mapped[str] = mapped_column(String(40), default="", index=True)  # digits
    id_number: Mapped[str] = mapped_column(String(32), default="")
    __table_args__ = (
        # One owner per resident ID number; owners without one may repeat.
        Index("uq_owners_id_number", "id_number", unique=True,
              sqlite_where=text("id_number <> ''"), postgresql_where=text("id_number <> ''")),
    )


class Vehicle(Base):
    """A registered e-bike. The tag is the primary key: 64 bits, any value a valid tag
    (`registry.tags`). `*_key` columns are the search keys of `registry.normalize`."""

    __tablename__ = "vehicles"
    tag: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    plate: Mapped[str] = mapped_column(String(32), default="")
    plate_key: Mapped[str] = mapped_column(String(32), default="", index=True)
    frame_no: Mapped[str] = mapped_column(String(32), default="")
    frame_key: Mapped[str] = mapped_column(String(32), default="", index=True)
    brand: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str] = mapped_column(String(64), default="")
    color: Mapped[str] = mapped_column(String(32), default="")
    registered_ms: Mapped[int | None] = mapped_column(BigInteger)
    community: Mapped[str | None] = mapped_column(String(64), ForeignKey("communities.id"),
                                                  index=True)
    owner_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("owners.id"),
                                                 index=True)


class TheftCase(Base):
    __tablename__ = "theft_cases"
    case_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tag: Mapped[int] = mapped_column(BigInteger, ForeignKey("vehicles.tag"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="open")
    stolen_ms: Mapped[int] = mapped_column(BigInteger)
    reported_ms: Mapped[int] = mapped_column(BigInteger)
    closed_ms: Mapped[int | None] = mapped_column(BigInteger)
    updates: Mapped[int] = mapped_column(Integer, default=0)  # alerts raised so far
    acked_ms: Mapped[int | None] = mapped_column(BigInteger)   # a patrol took it on
    acked_by: Mapped[str | None] = mapped_column(String(100))
    place: Mapped[str] = mapped_column(String(200), default="")        # where it was stolen
    report_no: Mapped[str] = mapped_column(String(64), default="")     # police report number
    police_unit: Mapped[str] = mapped_column(String(100), default="")  # who took the report
    recovered_how: Mapped[str] = mapped_column(String(200), default="")
    notes: Mapped[str] = mapped_column(String(2000), default="")
    # After this the case raises no alerts (it stays open); null: never.
    expires_ms: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (
        CheckConstraint("status IN ('open', 'recovered', 'cancelled')", name="status"),
        # One open case per tag, enforced by the database (partial unique index).
        Index("uq_theft_cases_open_tag", "tag", unique=True,
              sqlite_where=text("status = 'open'"), postgresql_where=text("status = 'open'")),
    )


class CaseEvent(Base):
    """Every change to a case or its alerts, with who made it: opened, acknowledged (the
    case or one alert), recovered. Appended, never changed."""

    __tablename__ = "case_events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    # null for an alert of a bike with no case (tamper, impossible_travel)
    case_id: Mapped[str | None] = mapped_column(String(64), ForeignKey("theft_cases.case_id"),
                                                index=True)
    at_ms: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(100))
    # opened | updated | acknowledged | recovered | cancelled
    action: Mapped[str] = mapped_column(String(32))
    alert_id: Mapped[str | None] = mapped_column(String(26))  # an alert acknowledged
    note: Mapped[str] = mapped_column(String(500), default="")


class ApiToken(Base):
    """An HTTP API token (`bikewatch token create`). Only the SHA-256 of the secret is
    kept: the secret is shown once, at creation. One role per token."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # clerk | police | ops | admin
    zones: Mapped[str] = mapped_column(String(1000), default="")  # comma-separated; "": all
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_ms: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (
        CheckConstraint("role IN ('clerk', 'police', 'ops', 'admin')", name="role"),
    )


class AuditEntry(Base):
    """Every read of unmasked personal data: who, in which role, when, which record,
    and why if the caller said. Appended, never changed; read by `admin`."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    at_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    actor: Mapped[str] = mapped_column(String(100))   # the token's name
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))   # read_personal_data, ...
    record: Mapped[str] = mapped_column(String(100))  # vehicle:00a1b2c3, case:LH-1
    reason: Mapped[str] = mapped_column(String(500), default="")


class RegistryVersion(Base):
    """One row; bumped in the same transaction as every change the workers must see."""

    __tablename__ = "registry_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class SeenBatch(Base):
    """Dedupe keys of PROTOCOL.md 2.4, kept at least 24 hours."""

    __tablename__ = "seen_batches"
    station: Mapped[str] = mapped_column(String(64), primary_key=True)
    boot: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    received_ms: Mapped[int] = mapped_column(BigInteger, index=True)


class Visit(Base):
    """A tag's stay in range of one station (PROTOCOL.md section 3)."""

    __tablename__ = "visits"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    tag: Mapped[int] = mapped_column(BigInteger)
    station: Mapped[str] = mapped_column(String(64))
    first_ms: Mapped[int] = mapped_column(BigInteger)
    last_ms: Mapped[int] = mapped_column(BigInteger)
    reads: Mapped[int] = mapped_column(Integer)
    best_rssi: Mapped[int | None] = mapped_column(SmallInteger)
    __table_args__ = (
        # Also serves a tag's trajectory (its leading column); a second index on
        # (tag, first_ms) cost a third of the upsert time and was dropped in 0002.
        UniqueConstraint("tag", "station", "first_ms", name="uq_visits_tag_station_first"),
    )


class VisitLog(Base):
    """Visit segments committed with their batches, waiting to be folded into `visits`
    (see `ingest.visitlog`): one row per group of batches."""

    __tablename__ = "visit_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    stations: Mapped[str] = mapped_column(Text)       # JSON list; segments index into it
    segments: Mapped[bytes] = mapped_column(LargeBinary)  # ingest.visitlog.SEGMENT records


class Alert(Base):
    """Every alert raised, and the outbox of its delivery (`published_ms` null: pending)."""

    __tablename__ = "alerts"
    alert_id: Mapped[str] = mapped_column(String(26), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    case_id: Mapped[str] = mapped_column(String(64), index=True)  # "": no case (tamper, ...)
    tag: Mapped[int] = mapped_column(BigInteger)
    station: Mapped[str] = mapped_column(String(64))
    zone: Mapped[str] = mapped_column(String(64))
    visit_first_ms: Mapped[int] = mapped_column(BigInteger)
    update_no: Mapped[int] = mapped_column(Integer)
    raised_ms: Mapped[int] = mapped_column(BigInteger)
    received_ms: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[str] = mapped_column(Text)
    published_ms: Mapped[int | None] = mapped_column(BigInteger, index=True)
    acked_ms: Mapped[int | None] = mapped_column(BigInteger)
    acked_by: Mapped[str | None] = mapped_column(String(100))
    __table_args__ = (
        # One alert per visit, kind and case ("" for the kinds that need none): a
        # repeated batch, a retried transaction or another worker cannot raise it twice.
        UniqueConstraint("case_id", "kind", "tag", "station", "visit_first_ms",
                         name="uq_alerts_visit"),
    )


class Delivery(Base):
    """One alert to one webhook: created with the alert, in its transaction, and retried
    until delivered or dead-lettered (`alerts.webhook`). MQTT delivery is `Alert.published_ms`."""

    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    alert_id: Mapped[str] = mapped_column(String(26), ForeignKey("alerts.alert_id"))
    channel: Mapped[str] = mapped_column(String(64))   # the webhook's name
    created_ms: Mapped[int] = mapped_column(BigInteger)
    next_ms: Mapped[int] = mapped_column(BigInteger)   # next attempt
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    delivered_ms: Mapped[int | None] = mapped_column(BigInteger)
    dead_ms: Mapped[int | None] = mapped_column(BigInteger)
    last_error: Mapped[str] = mapped_column(String(300), default="")
    __table_args__ = (
        UniqueConstraint("alert_id", "channel", name="uq_deliveries_alert_channel"),
        # The sender's question, per webhook: what is due? Only pending rows are indexed.
        Index("ix_deliveries_due", "channel", "next_ms",
              sqlite_where=text("delivered_ms IS NULL AND dead_ms IS NULL"),
              postgresql_where=text("delivered_ms IS NULL AND dead_ms IS NULL")),
    )


class RejectRecord(Base):
    """The bounded reject store of PROTOCOL.md 2.5 (newest 10,000, payloads cut to 64 KiB)."""

    __tablename__ = "rejects"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    received_ms: Mapped[int] = mapped_column(BigInteger)
    station: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(32))
    reads: Mapped[int] = mapped_column(Integer, default=1)  # reads dropped; 0 for a payload
    detail: Mapped[str] = mapped_column(String(300))
    boot: Mapped[int | None] = mapped_column(BigInteger)
    seq: Mapped[int | None] = mapped_column(BigInteger)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
