"""CSV import of stations and vehicles (PROTOCOL.md section 4).

Every row is checked on its own: good rows are imported, bad rows are
reported with their line number and reason. Importing the same file again
changes nothing (rows are compared, not blindly rewritten), and the registry
version is bumped only when something changed, in the same transaction.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from registry.errors import Invalid
from registry.models import RegistryVersion, Station, Vehicle
from registry.tags import BadTag, parse_tag, to_db

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # station and zone ids (PROTOCOL.md section 1)
STATION_COLUMNS = ("id", "name", "lat", "lon", "zone")
VEHICLE_COLUMNS = ("tag", "plate", "owner_name", "owner_phone", "brand", "color")
_CHUNK = 500


@dataclass(slots=True)
class ImportReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    def summary(self, what: str) -> str:
        return (f"{what}: {self.added} added, {self.updated} updated, "
                f"{self.unchanged} unchanged, {len(self.errors)} bad rows")


def _station_row(row: dict[str, str]) -> dict[str, Any]:
    sid, zone = row["id"].strip(), row["zone"].strip() or "unassigned"
    if not NAME_RE.fullmatch(sid):
        raise ValueError(f"bad station id {sid[:70]!r}")
    if not NAME_RE.fullmatch(zone):
        raise ValueError(f"bad zone {zone[:70]!r}")
    lat, lon = _coordinate(row["lat"], 90, "lat"), _coordinate(row["lon"], 180, "lon")
    if (lat is None) != (lon is None):
        raise ValueError("lat and lon must be given together")
    out = {"id": sid, "name": row["name"].strip()[:200], "lat": lat, "lon": lon, "zone": zone}
    if "timeout_s" in row:  # optional: this station's heard-within timeout (ingest.health)
        out["timeout_s"] = _number(row["timeout_s"] or "", "timeout_s",
                                   lambda v: 0 < v <= 7 * 86_400, "is not in (0, 604800]")
    return out


def _coordinate(text: str, limit: float, name: str) -> float | None:
    return _number(text, name, lambda v: -limit <= v <= limit, "out of range")


def _number(text: str, name: str, valid: Callable[[float], bool], why: str) -> float | None:
    """An optional number column: None when empty, else a finite float that is `valid`."""
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {text[:30]!r} is not a number") from None
    if not (math.isfinite(value) and valid(value)):
        raise ValueError(f"{name} {value} {why}")
    return value


def _vehicle_row(row: dict[str, str]) -> dict[str, Any]:
    try:
        tag = parse_tag(row["tag"].strip())
    except BadTag as exc:
        raise ValueError(str(exc)) from None
    return {"tag": to_db(tag), "plate": row["plate"].strip()[:32],
            "owner_name": row["owner_name"].strip()[:200],
            "owner_phone": row["owner_phone"].strip()[:40],
            "brand": row["brand"].strip()[:64], "color": row["color"].strip()[:32]}


def parse_csv(text: str, columns: tuple[str, ...], key: str,
              check: Callable[[dict[str, str]], dict[str, Any]],
              report: ImportReport) -> list[dict[str, Any]]:
    """The good rows, keyed on `key` (a later duplicate in the file is a bad row)."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
        raise Invalid(f"the header lacks the column(s) {', '.join(missing)}; "
                      f"expected {','.join(columns)}")
    rows: dict[Any, dict[str, Any]] = {}
    first_line: dict[Any, int] = {}
    for row in reader:
        line = reader.line_num
        if any(row.get(c) is None for c in columns):
            report.errors.append((line, "too few fields"))
            continue
        try:
            good = check(row)
        except ValueError as exc:
            report.errors.append((line, str(exc)))
            continue
        k = good[key]
        if k in rows:
            report.errors.append((line, f"duplicate {key}, first at line {first_line[k]}"))
            continue
        rows[k], first_line[k] = good, line
    return list(rows.values())


async def _upsert(conn: AsyncConnection, model: type[Station] | type[Vehicle], key: str,
                  rows: list[dict[str, Any]], report: ImportReport,
                  provision: dict[str, Any]) -> None:
    """Insert new rows, update changed ones. `provision` is set on rows that become
    imported: new ones, and stations so far only heard of (`imported` false)."""
    col = getattr(model, key)
    fields = [k for k in (rows[0] if rows else {}) if k != key]
    flag = [Station.imported] if model is Station else []
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start:start + _CHUNK]
        existing = {r[0]: r for r in await conn.execute(
            select(col, *(getattr(model, f) for f in fields), *flag)
            .where(col.in_([r[key] for r in chunk])))}
        new = [r | provision for r in chunk if r[key] not in existing]
        if new:
            await conn.execute(insert(model), new)
        report.added += len(new)
        for r in chunk:
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
    await conn.execute(update(RegistryVersion).where(RegistryVersion.id == 1)
                       .values(version=RegistryVersion.version + 1))


async def import_stations(engine: AsyncEngine, text: str, now_ms: int) -> ImportReport:
    report = ImportReport()
    rows = parse_csv(text, STATION_COLUMNS, "id", _station_row, report)
    async with engine.begin() as conn:
        await _upsert(conn, Station, "id", rows, report,
                      {"imported": True, "imported_ms": now_ms})
        if report.added or report.updated:
            await bump_version(conn)
    return report


async def import_vehicles(engine: AsyncEngine, text: str) -> ImportReport:
    report = ImportReport()
    rows = parse_csv(text, VEHICLE_COLUMNS, "tag", _vehicle_row, report)
    async with engine.begin() as conn:
        await _upsert(conn, Vehicle, "tag", rows, report, {})
        if report.added or report.updated:
            await bump_version(conn)
    return report
