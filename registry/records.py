"""The registry's records as the HTTP API serves them: vehicles (with their owner for
those who may see it), stations, search, single-record writes and CSV export.

Writes go through `registry.imports` (the same checks and upsert as a CSV
row); reads of owners go through `registry.privacy` (shown to police and
clerks only, and audited in the read's transaction).
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.clock import iso
from registry.errors import Invalid, NotFound, Refused
from registry.imports import (
    OWNER_FIELDS,
    STATION_COLUMNS,
    STATION_OPTIONAL,
    VEHICLE_COLUMNS,
    VEHICLE_OPTIONAL,
    ImportReport,
    bump_version,
    station_record,
    vehicle_record,
    write_stations,
    write_vehicles,
)
from registry.models import Owner, Station, Vehicle
from registry.normalize import phone_key, plate_key
from registry.privacy import EXPORT, audit, owner_full, sees_owner
from registry.tags import format_tag, from_db, parse_tag, to_db
from registry.tokens import Principal

_VEHICLE = (Vehicle.tag, Vehicle.plate, Vehicle.frame_no, Vehicle.brand, Vehicle.model,
            Vehicle.color, Vehicle.registered_ms, Vehicle.community, Vehicle.owner_id,
            Owner.name.label("owner_name"), Owner.phone.label("owner_phone"),
            Owner.id_number.label("owner_id_number"))
Query = Select[*tuple[Any, ...]]
EDITABLE = ("plate", "frame_no", "brand", "model", "color", "registered_ms", "community")


def _vehicles() -> Query:
    return select(*_VEHICLE).outerjoin(Owner, Owner.id == Vehicle.owner_id)


def vehicle_view(r: Any, who: Principal) -> dict[str, Any]:
    out = {"tag": format_tag(from_db(r.tag)), "plate": r.plate, "frame_no": r.frame_no,
           "brand": r.brand, "model": r.model, "color": r.color,
           "registered_ms": r.registered_ms, "community": r.community}
    if sees_owner(who):
        out["owner"] = (owner_full(r.owner_name, r.owner_phone, r.owner_id_number)
                        if r.owner_id is not None else None)
    return out


async def _read_vehicles(engine: AsyncEngine, q: Query, who: Principal, now_ms: int,
                         reason: str) -> list[dict[str, Any]]:
    """Run a vehicle query; every owner shown is audited in the same transaction."""
    async with engine.begin() as conn:
        rows = (await conn.execute(q)).all()
        if sees_owner(who):
            await audit(conn, who, (f"vehicle:{format_tag(from_db(r.tag))}" for r in rows
                                    if r.owner_id is not None), now_ms, reason)
    return [vehicle_view(r, who) for r in rows]


async def find_vehicles(engine: AsyncEngine, who: Principal, now_ms: int, *,
                        tag: str | None = None, plate: str | None = None,
                        frame_no: str | None = None, phone: str | None = None,
                        community: str | None = None, limit: int = 50, offset: int = 0,
                        reason: str = "") -> list[dict[str, Any]]:
    """Vehicles matching every criterion given; plates and frame numbers by their search
    keys (look-alike characters match), phones by their digits."""
    q = _vehicles().order_by(Vehicle.tag).limit(limit).offset(offset)
    if tag is not None:
        q = q.where(Vehicle.tag == to_db(parse_tag(tag)))
    if plate is not None:
        q = q.where(Vehicle.plate_key == plate_key(plate))
    if frame_no is not None:
        q = q.where(Vehicle.frame_key == plate_key(frame_no))
    if phone is not None:
        if not sees_owner(who):
            raise Refused("searching by owner phone needs a police or clerk token")
        digits = phone_key(phone)
        if len(digits) < 5:
            raise Invalid("give at least 5 digits of the phone number")
        q = q.where(Owner.phone_key == digits)
    if community is not None:
        q = q.where(Vehicle.community == community)
    return await _read_vehicles(engine, q, who, now_ms, reason)


async def get_vehicle(engine: AsyncEngine, who: Principal, tag: int, now_ms: int,
                      reason: str = "") -> dict[str, Any]:
    found = await _read_vehicles(engine, _vehicles().where(Vehicle.tag == to_db(tag)), who,
                                 now_ms, reason)
    if not found:
        raise NotFound(f"tag {format_tag(tag)} is not registered")
    return found[0]


def _owner_fields(owner: Mapping[str, str] | None) -> dict[str, str]:
    if owner is None:
        return {}
    return {"owner_name": owner.get("name", ""), "owner_phone": owner.get("phone", ""),
            "owner_id_number": owner.get("id_number", "")}


async def create_vehicle(engine: AsyncEngine, fields: Mapping[str, Any],
                         owner: Mapping[str, str] | None) -> None:
    """A new vehicle; Refused if its tag is registered already."""
    record = _checked_vehicle(dict(fields) | _owner_fields(owner))
    async with engine.begin() as conn:
        taken = await conn.execute(select(Vehicle.tag).where(Vehicle.tag == record["tag"]))
        if taken.first() is not None:
            raise Refused(f"tag {format_tag(from_db(record['tag']))} is registered already")
        await write_vehicles(conn, [record], ImportReport())
        await bump_version(conn)


async def update_vehicle(engine: AsyncEngine, tag: int, changes: Mapping[str, Any],
                         owner: Mapping[str, str] | None) -> bool:
    """Change the fields given (and the owner, if given); True if anything changed."""
    async with engine.begin() as conn:
        row = (await conn.execute(_vehicles().where(Vehicle.tag == to_db(tag)))).first()
        if row is None:
            raise NotFound(f"tag {format_tag(tag)} is not registered")
        current = {f: getattr(row, f) for f in EDITABLE} | {
            f: getattr(row, f) or "" for f in OWNER_FIELDS}
        record = _checked_vehicle(current | dict(changes) | _owner_fields(owner)
                                  | {"tag": format_tag(tag)})
        if row.owner_id is None and not any(record[f] for f in OWNER_FIELDS):
            for f in OWNER_FIELDS:
                del record[f]
        report = ImportReport()
        await write_vehicles(conn, [record], report)
        if report.updated:
            await bump_version(conn)
    return bool(report.updated)


def _checked_vehicle(fields: dict[str, Any]) -> dict[str, Any]:
    try:
        return vehicle_record(
            fields.pop("tag"), fields.pop("plate", None) or "", fields.pop("brand", None) or "",
            fields.pop("color", None) or "",
            **{k: ("" if v is None and k != "registered_ms" else v) for k, v in fields.items()})
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _iso(ms: int | None) -> str:
    return "" if ms is None else iso(ms)


def _csv_line(values: Iterable[object]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(values)
    return out.getvalue()


async def export_vehicles(engine: AsyncEngine, who: Principal, now_ms: int,
                          reason: str = "") -> AsyncIterator[str]:
    """Every vehicle as CSV in the import's columns, owners included (the export is one
    audit entry), streamed: importing it again changes nothing."""
    async with engine.begin() as conn:
        await audit(conn, who, ["vehicles:all"], now_ms, reason, action=EXPORT)
    yield _csv_line(VEHICLE_COLUMNS + VEHICLE_OPTIONAL)
    async with engine.connect() as conn:
        result = await conn.stream(_vehicles().order_by(Vehicle.tag)
                                   .execution_options(yield_per=5_000))
        async for r in result:
            yield _csv_line((format_tag(from_db(r.tag)), r.plate, r.owner_name or "",
                             r.owner_phone or "", r.brand, r.color, r.frame_no, r.model,
                             _iso(r.registered_ms), r.community or "",
                             r.owner_id_number or ""))


def station_view(r: Any) -> dict[str, Any]:
    return {"id": r.id, "name": r.name, "lat": r.lat, "lon": r.lon, "zone": r.zone,
            "community": r.community, "installed_ms": r.installed_ms,
            "imported": r.imported, "imported_ms": r.imported_ms, "timeout_s": r.timeout_s,
            "status": r.status, "last_heard_ms": r.last_heard_ms,
            "last_read_ms": r.last_read_ms}


def _stations(who: Principal) -> Query:
    q = select(Station)
    return q if who.zones is None else q.where(Station.zone.in_(who.zones))


async def list_stations(engine: AsyncEngine, who: Principal, *, zone: str | None = None,
                        community: str | None = None, limit: int = 100, offset: int = 0,
                        ) -> list[dict[str, Any]]:
    """Stations by id; a zone-limited token sees its zones' only."""
    q = _stations(who).order_by(Station.id).limit(limit).offset(offset)
    if zone is not None:
        q = q.where(Station.zone == zone)
    if community is not None:
        q = q.where(Station.community == community)
    async with engine.connect() as conn:
        return [station_view(r) for r in (await conn.execute(q)).all()]


async def get_station(engine: AsyncEngine, who: Principal, sid: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = (await conn.execute(_stations(who).where(Station.id == sid))).first()
    if row is None:
        raise NotFound(f"unknown station {sid[:70]!r}")
    return station_view(row)


async def save_station(engine: AsyncEngine, fields: Mapping[str, Any], now_ms: int) -> bool:
    """Create or change one station, as one CSV row would; True if anything changed."""
    f = dict(fields)
    try:
        record = station_record(f.pop("id"), f.pop("name", ""), f.pop("lat", None),
                                f.pop("lon", None), f.pop("zone", ""), **f)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    report = ImportReport()
    async with engine.begin() as conn:
        await write_stations(conn, [record], now_ms, report)
        if report.added or report.updated:
            await bump_version(conn)
    return bool(report.added or report.updated)


async def export_stations(engine: AsyncEngine) -> AsyncIterator[str]:
    """Every imported station as CSV in the import's columns."""
    yield _csv_line(STATION_COLUMNS + STATION_OPTIONAL)
    async with engine.connect() as conn:
        result = await conn.stream(select(Station).where(Station.imported)
                                   .order_by(Station.id))
        async for s in result:
            yield _csv_line((s.id, s.name, "" if s.lat is None else s.lat,
                             "" if s.lon is None else s.lon, s.zone,
                             "" if s.timeout_s is None else s.timeout_s, s.community or "",
                             _iso(s.installed_ms)))
