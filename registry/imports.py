"""Registry writes: CSV import of stations and vehicles (PROTOCOL.md section 4), and the
single-record writes of the HTTP API, through the same checks and the same upsert.

Every row is checked on its own: good rows are written, bad rows are reported
with their line number and reason. Writing the same rows again changes nothing
(rows are compared, not blindly rewritten), and the registry version is bumped
only when something changed, in the same transaction. Columns beyond the
contract's are optional; a file without one leaves that field as it was.

A file is read and written in chunks, so a million vehicles take a bounded
amount of memory beyond the set of keys that catches duplicates in the file.
"""

from __future__ import annotations

import csv
import io
import math
import re
import zoneinfo
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, literal_column, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ingest.clock import parse_iso
from registry.errors import Invalid
from registry.models import Community, Owner, RegistryVersion, Station, Vehicle, Zone
from registry.normalize import phone_key, plate_key
from registry.notify import announce
from registry.tags import BadTag, parse_tag, to_db

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # station, zone and community ids
STATION_COLUMNS = ("id", "name", "lat", "lon", "zone")
STATION_OPTIONAL = ("timeout_s", "community", "installed_at")
VEHICLE_COLUMNS = ("tag", "plate", "owner_name", "owner_phone", "brand", "color")
VEHICLE_OPTIONAL = ("frame_no", "model", "registered_at", "community", "owner_id_number")
OWNER_FIELDS = ("owner_name", "owner_phone", "owner_id_number")
_CHUNK = 2_000
UTC = zoneinfo.ZoneInfo("UTC")
Progress = Callable[[int], None]  # rows done so far


@dataclass(slots=True)
class ImportReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    def summary(self, what: str) -> str:
        return (f"{what}: {self.added} added, {self.updated} updated, "
                f"{self.unchanged} unchanged, {len(self.errors)} bad rows")

    def as_json(self) -> dict[str, Any]:
        return {"added": self.added, "updated": self.updated, "unchanged": self.unchanged,
                "errors": [{"line": line, "reason": why} for line, why in self.errors]}


def check_name(value: str, what: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(f"bad {what} {value[:70]!r}: 1 to 64 of A-Z a-z 0-9 . _ -")
    return value


def station_record(sid: str, name: str, lat: float | None, lon: float | None, zone: str,
                   **optional: Any) -> dict[str, Any]:
    """A station as stored; ValueError says what is wrong. `optional`: timeout_s,
    community, installed_ms, each only when given."""
    check_name(sid, "station id")
    check_name(zone or "unassigned", "zone")
    for value, limit, what in ((lat, 90, "lat"), (lon, 180, "lon")):
        if value is not None and not (math.isfinite(value) and -limit <= value <= limit):
            raise ValueError(f"{what} {value} out of range")
    if (lat is None) != (lon is None):
        raise ValueError("lat and lon must be given together")
    timeout = optional.get("timeout_s")
    if timeout is not None and not 0 < timeout <= 7 * 86_400:
        raise ValueError(f"timeout_s {timeout} is not in (0, 604800]")
    if optional.get("community"):
        check_name(optional["community"], "community")
    return {"id": sid, "name": name.strip()[:200], "lat": lat, "lon": lon,
            "zone": zone or "unassigned"} | optional


def vehicle_record(tag: str, plate: str, brand: str, color: str, **optional: Any
                   ) -> dict[str, Any]:
    """A vehicle as stored, with its owner's fields (`owner_*`) still inline: the upsert
    resolves them to an owner. `optional`: frame_no, model, registered_ms, community and
    the owner fields, each only when given."""
    try:
        value = parse_tag(tag.strip())
    except BadTag as exc:
        raise ValueError(str(exc)) from None
    row: dict[str, Any] = {"tag": to_db(value), "plate": plate.strip()[:32],
           "plate_key": plate_key(plate)[:32], "brand": brand.strip()[:64],
           "color": color.strip()[:32]}
    if "frame_no" in optional:
        row |= {"frame_no": optional["frame_no"].strip()[:32],
                "frame_key": plate_key(optional["frame_no"])[:32]}
    if "model" in optional:
        row["model"] = optional["model"].strip()[:64]
    if "registered_ms" in optional:
        row["registered_ms"] = optional["registered_ms"]
    if "community" in optional:
        row["community"] = check_name(optional["community"], "community") \
            if optional["community"] else None
    for f in OWNER_FIELDS:
        if f in optional:
            row[f] = optional[f].strip()[:200]
    if len(row.get("owner_phone", "")) > 40 or len(row.get("owner_id_number", "")) > 32:
        raise ValueError("owner_phone is at most 40 characters, owner_id_number 32")
    return row


def _optional_number(text: str, name: str) -> float | None:
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} {text[:30]!r} is not a number") from None


def _optional_time(text: str, name: str, tz: zoneinfo.ZoneInfo) -> int | None:
    try:
        return parse_iso(text.strip(), tz) if text.strip() else None
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _station_csv(row: dict[str, str], tz: zoneinfo.ZoneInfo) -> dict[str, Any]:
    optional: dict[str, Any] = {}
    if "timeout_s" in row:  # this station's heard-within timeout (ingest.health)
        optional["timeout_s"] = _optional_number(row["timeout_s"] or "", "timeout_s")
    if "community" in row:
        optional["community"] = (row["community"] or "").strip() or None
    if "installed_at" in row:
        optional["installed_ms"] = _optional_time(row["installed_at"] or "", "installed_at",
                                                  tz)
    return station_record(row["id"].strip(), row["name"],
                          _optional_number(row["lat"], "lat"),
                          _optional_number(row["lon"], "lon"), row["zone"].strip(), **optional)


def _vehicle_csv(row: dict[str, str], tz: zoneinfo.ZoneInfo) -> dict[str, Any]:
    optional: dict[str, Any] = {k: row[k] or "" for k in VEHICLE_OPTIONAL + OWNER_FIELDS
                                if k in row and k != "registered_at"}
    if "registered_at" in row:
        optional["registered_ms"] = _optional_time(row["registered_at"] or "",
                                                   "registered_at", tz)
    if "community" in optional:
        optional["community"] = optional["community"].strip()
    return vehicle_record(row["tag"], row["plate"], row["brand"], row["color"], **optional)


def _csv_chunks(text: str, columns: tuple[str, ...], key: str,
                check: Callable[[dict[str, str]], dict[str, Any]],
                report: ImportReport) -> Iterator[list[dict[str, Any]]]:
    """The good rows in chunks; a later duplicate of `key` in the file is a bad row. A
    file that is not CSV at all (Invalid) imports nothing: its transaction rolls back."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        yield from _chunks(reader, columns, key, check, report)
    except csv.Error as exc:
        raise Invalid(f"line {reader.line_num}: not CSV: {exc}") from None


def _chunks(reader: csv.DictReader[str], columns: tuple[str, ...], key: str,
            check: Callable[[dict[str, str]], dict[str, Any]],
            report: ImportReport) -> Iterator[list[dict[str, Any]]]:
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
        raise Invalid(f"the header lacks the column(s) {', '.join(missing)}; "
                      f"expected {','.join(columns)}")
    first_line: dict[Any, int] = {}
    chunk: list[dict[str, Any]] = []
    for row in reader:
        line = reader.line_num
        if any(row.get(c) is None for c in columns):
            report.errors.append((line, "too few fields"))
            continue
        try:
            good = check(row)
        except ValueError as exc:
            report.errors.append((line, str(exc)[:300]))
            continue
        k = good[key]
        if k in first_line:
            report.errors.append((line, f"duplicate {key}, first at line {first_line[k]}"))
            continue
        first_line[k] = line
        chunk.append(good)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _ensure(conn: AsyncConnection, model: type[Zone] | type[Community],
                  ids: set[str]) -> None:
    """Create the zones or communities that rows name and the registry lacks."""
    ids.discard("")
    if not ids:
        return
    have = set((await conn.execute(select(model.id).where(model.id.in_(ids)))).scalars())
    if ids - have:
        await conn.execute(insert(model), [{"id": i, "name": ""} for i in sorted(ids - have)])


async def _resolve_owners(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Replace each row's owner fields by `owner_id`: the owner with that resident ID
    number, else the one with that name and phone number (digits compared), else a new
    one. An owner found by ID number takes the row's name and phone."""
    if not any(f in rows[0] for f in OWNER_FIELDS):
        return
    wanted: dict[tuple[str, ...], tuple[str, str, str]] = {}
    for r in rows:
        name, phone = r.pop("owner_name", ""), r.pop("owner_phone", "")
        id_number = r.pop("owner_id_number", "")
        key = ("id", id_number) if id_number else ("np", name, phone_key(phone))
        r["owner_id"] = key if (name or phone or id_number) else None
        if r["owner_id"] is not None:
            wanted[key] = (name, phone, id_number)
    found = await _owners(conn, wanted)
    for owner_key, (owner_id, *stored) in found.items():
        now = wanted[owner_key]
        if owner_key[0] == "id" and tuple(stored) != now[:2]:  # moved, renamed
            await conn.execute(update(Owner).where(Owner.id == owner_id).values(
                name=now[0], phone=now[1], phone_key=phone_key(now[1])))
    new = [k for k in wanted if k not in found]
    if new:  # one executemany, then read the ids back: RETURNING goes row by row here
        await conn.execute(insert(Owner), [
            {"name": wanted[k][0], "phone": wanted[k][1], "phone_key": phone_key(wanted[k][1]),
             "id_number": wanted[k][2]} for k in new])
        found |= await _owners(conn, {k: wanted[k] for k in new})
    for r in rows:
        if r["owner_id"] is not None:
            r["owner_id"] = found[r["owner_id"]][0]


async def _owners(conn: AsyncConnection, keys: Mapping[tuple[str, ...], object],
                  ) -> dict[tuple[str, ...], tuple[int, str, str]]:
    """The stored owners of these keys: key -> (id, name, phone); the oldest of several."""
    found: dict[tuple[str, ...], tuple[int, str, str]] = {}
    ids = [k[1] for k in keys if k[0] == "id"]
    if ids:
        # `<> ''` as the partial unique index says it, as a literal: with a bound parameter
        # neither SQLite nor PostgreSQL's generic plan (a prepared statement run a sixth
        # time) can prove the index applies, and each chunk scans every owner.
        for o in await conn.execute(select(Owner.id, Owner.id_number, Owner.name, Owner.phone)
                                    .where(Owner.id_number.in_(ids),
                                           Owner.id_number != literal_column("''"))):
            found["id", o.id_number] = (o.id, o.name, o.phone)
    phones = {k[2] for k in keys if k[0] == "np"}
    if phones:  # by the indexed phone key, then the name
        for o in await conn.execute(select(Owner.id, Owner.name, Owner.phone, Owner.phone_key)
                                    .where(Owner.phone_key.in_(phones)).order_by(Owner.id)):
            key = ("np", o.name, o.phone_key)
            if key in keys:
                found.setdefault(key, (o.id, o.name, o.phone))
    return found


async def _upsert(conn: AsyncConnection, model: type[Station] | type[Vehicle], key: str,
                  rows: list[dict[str, Any]], report: ImportReport,
                  provision: dict[str, Any]) -> None:
    """Insert new rows, update changed ones. `provision` is set on rows that become
    imported: new ones, and stations so far only heard of (`imported` false)."""
    col = getattr(model, key)
    fields = [k for k in rows[0] if k != key]
    flag = [Station.imported] if model is Station else []
    existing = {r[0]: r for r in await conn.execute(
        select(col, *(getattr(model, f) for f in fields), *flag)
        .where(col.in_([r[key] for r in rows])))}
    new = [r | provision for r in rows if r[key] not in existing]
    if new:
        await conn.execute(insert(model), new)
    report.added += len(new)
    for r in rows:
        old = existing.get(r[key])
        if old is None:
            continue
        provisioned = bool(old[-1]) if flag else True
        if tuple(old[1:1 + len(fields)]) == tuple(r[f] for f in fields) and provisioned:
            report.unchanged += 1
            continue
        values = {f: r[f] for f in fields} | ({} if provisioned else provision)
        await conn.execute(update(model).where(col == r[key]).values(**values))
        report.updated += 1


async def bump_version(conn: AsyncConnection) -> None:
    """Every change the workers must see bumps the version in its transaction; on
    PostgreSQL the workers are told on commit (`registry.notify`)."""
    await conn.execute(update(RegistryVersion).where(RegistryVersion.id == 1)
                       .values(version=RegistryVersion.version + 1))
    await announce(conn)


async def write_stations(conn: AsyncConnection, rows: list[dict[str, Any]], now_ms: int,
                         report: ImportReport) -> None:
    """Checked station records (`station_record`) into the registry, in `conn`'s
    transaction; the caller bumps the version if the report shows a change."""
    await _ensure(conn, Zone, {r["zone"] for r in rows})
    await _ensure(conn, Community, {r.get("community") or "" for r in rows})
    await _upsert(conn, Station, "id", rows, report, {"imported": True, "imported_ms": now_ms})


async def write_vehicles(conn: AsyncConnection, rows: list[dict[str, Any]],
                         report: ImportReport) -> None:
    """Checked vehicle records (`vehicle_record`) into the registry, owners resolved."""
    await _ensure(conn, Community, {r.get("community") or "" for r in rows})
    await _resolve_owners(conn, rows)
    await _upsert(conn, Vehicle, "tag", rows, report, {})


async def import_stations(engine: AsyncEngine, text: str, now_ms: int,
                          tz: zoneinfo.ZoneInfo = UTC,
                          progress: Progress | None = None) -> ImportReport:
    report = ImportReport()
    async with engine.begin() as conn:
        for chunk in _csv_chunks(text, STATION_COLUMNS, "id",
                                 lambda row: _station_csv(row, tz), report):
            await write_stations(conn, chunk, now_ms, report)
            if progress:
                progress(report.added + report.updated + report.unchanged)
        if report.added or report.updated:
            await bump_version(conn)
    return report


async def import_vehicles(engine: AsyncEngine, text: str,
                          tz: zoneinfo.ZoneInfo = UTC,
                          progress: Progress | None = None) -> ImportReport:
    report = ImportReport()
    async with engine.begin() as conn:
        for chunk in _csv_chunks(text, VEHICLE_COLUMNS, "tag",
                                 lambda row: _vehicle_csv(row, tz), report):
            await write_vehicles(conn, chunk, report)
            if progress:
                progress(report.added + report.updated + report.unchanged)
        if report.added or report.updated:
            await bump_version(conn)
    return report
