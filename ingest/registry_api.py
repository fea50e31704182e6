"""The registry's HTTP API: vehicles and their owners, stations, theft cases, CSV import
and export, and the audit log. Mounted by `ingest.http.build_app`; roles per route
as `docs/protocol.md` lists them."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.access import ApiError, CsvStream, answers, require
from ingest.clock import Clock
from ingest.config import Settings
from ingest.paging import Page, Paged, Rows
from registry.cases import (
    acknowledge_alert,
    acknowledge_case,
    cancel_case,
    recover_theft,
    report_theft,
    update_case,
)
from registry.errors import Invalid, NotFound, Refused
from registry.imports import import_stations, import_vehicles
from registry.privacy import audit_log
from registry.queries import case_detail, list_cases, visible
from registry.records import (
    create_vehicle,
    export_stations,
    export_vehicles,
    find_vehicles,
    get_station,
    get_vehicle,
    list_stations,
    save_station,
    update_vehicle,
)
from registry.tags import BadTag, format_tag, parse_tag
from registry.tokens import Principal

_T = TypeVar("_T")
NAME = r"^[A-Za-z0-9._-]{1,64}$"
MAX_CSV = 256 * 1024 * 1024  # a million vehicles with every column is about 120 MB
_CSV_BODY = {"requestBody": {"required": True, "content": {
    "text/csv": {"schema": {"type": "string"}}}}}
Reason = Annotated[str, Query(max_length=500, description="why you read personal data; "
                                                          "kept in the audit log")]


async def refusable(change: Awaitable[_T]) -> _T:
    """A refused change is a 404 (unknown record), 400 (malformed) or 409, not a 500."""
    try:
        return await change
    except Refused as exc:
        status = 404 if isinstance(exc, NotFound) else 400 if isinstance(exc, Invalid) else 409
        raise ApiError(status, str(exc)) from None


def tag_of(text: str) -> int:
    try:
        return parse_tag(text)
    except BadTag as exc:
        raise ApiError(400, str(exc)) from None


class Actor(BaseModel):
    """A change's note, and who at the token's desk makes it (recorded as
    "<by> via <token>"; the token's name alone when `by` is not given)."""

    by: str = Field("", max_length=60)
    note: str = Field("", max_length=500)

    def actor(self, who: Principal) -> str:
        return f"{self.by} via {who.name}"[:100] if self.by else who.name


class Owner(BaseModel):
    name: str = Field("", max_length=200)
    phone: str = Field("", max_length=40)
    id_number: str = Field("", max_length=32)


class VehicleChange(BaseModel):
    plate: str | None = Field(None, max_length=32)
    frame_no: str | None = Field(None, max_length=32)
    brand: str | None = Field(None, max_length=64)
    model: str | None = Field(None, max_length=64)
    color: str | None = Field(None, max_length=32)
    registered_ms: int | None = Field(None, ge=0, le=2**53)
    community: str | None = Field(None, pattern=NAME)
    owner: Owner | None = None


class NewVehicle(VehicleChange):
    tag: str = Field(max_length=40, description="the RFID tag, hex (PROTOCOL.md)")


class VehicleSearch(BaseModel):
    tag: str | None = Field(None, max_length=40)
    plate: str | None = Field(None, max_length=64)
    frame_no: str | None = Field(None, max_length=64)
    phone: str | None = Field(None, max_length=40, description="the owner's (clerk, police)")
    community: str | None = Field(None, pattern=NAME)
    reason: str = Field("", max_length=500, description="why you read personal data; "
                                                        "kept in the audit log")


class CaseDetails(Actor):
    place: str | None = Field(None, max_length=200)
    report_no: str | None = Field(None, max_length=64)
    police_unit: str | None = Field(None, max_length=100)
    notes: str | None = Field(None, max_length=2000)
    expires_ms: int | None = Field(None, ge=0, le=2**53,
                                   description="no alerts after this; null: never")


class NewCase(CaseDetails):
    case_id: str = Field(pattern=NAME)
    tag: str = Field(max_length=40)
    stolen_ms: int | None = Field(None, ge=0, le=2**53, description="default: now")


class Recovery(Actor):
    how: str = Field("", max_length=200, description="how the bike was found")


class StationIn(BaseModel):
    name: str = Field("", max_length=200)
    lat: float | None = Field(None, ge=-90, le=90)
    lon: float | None = Field(None, ge=-180, le=180)
    zone: str = Field("unassigned", pattern=NAME)
    community: str | None = Field(None, pattern=NAME)
    installed_ms: int | None = Field(None, ge=0, le=2**53)
    timeout_s: float | None = Field(None, gt=0, le=7 * 86_400)


def _details(body: BaseModel) -> dict[str, Any]:
    return {k: v for k, v in body.model_dump(exclude_unset=True).items()
            if k not in ("by", "note", "case_id", "tag", "stolen_ms")}


async def _csv(request: Request) -> str:
    if int(request.headers.get("content-length") or 0) > MAX_CSV:
        raise ApiError(413, f"a CSV upload is at most {MAX_CSV >> 20} MiB")
    body = await request.body()
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "the CSV is not UTF-8 text") from None


def registry_routes(engine: AsyncEngine, settings: Settings, clock: Clock) -> APIRouter:
    api = APIRouter(prefix="/api/v1")
    clerk, ops, admin = require("clerk"), require("ops"), require("admin")
    police = require("police")
    readers = require("clerk", "police", "ops")
    case_desk = require("clerk", "police")
    field_ops = require("ops", "police")

    # vehicles ------------------------------------------------------------------------
    @api.get("/vehicles")
    async def vehicles(page: Paged, who: Principal = readers, tag: str | None = None,
                       plate: str | None = Query(None, max_length=64),
                       frame_no: str | None = Query(None, max_length=64),
                       community: str | None = Query(None, pattern=NAME),
                       reason: Reason = "") -> Rows:
        """List or search: every criterion given must match. Plates and frame numbers
        match with look-alike characters folded (O and 0, I and 1, ...). To search by
        owner phone, POST /api/v1/vehicles/search: a phone has no place in a URL."""
        return await _search(page, who, VehicleSearch(
            tag=tag, plate=plate, frame_no=frame_no, phone=None, community=community,
            reason=reason))

    @api.post("/vehicles/search")
    async def search(body: VehicleSearch, page: Paged, who: Principal = readers) -> Rows:
        """As GET /api/v1/vehicles, and by owner phone (clerk, police; digits compared),
        with the criteria in the body, out of URLs and so out of access logs."""
        if body.phone is not None and who.role not in ("clerk", "police"):
            raise ApiError(403, "searching by owner phone needs a clerk or police token")
        return await _search(page, who, body)

    async def _search(page: Page, who: Principal, q: VehicleSearch) -> Rows:
        if q.tag is not None:
            tag_of(q.tag)
        return page(await refusable(find_vehicles(
            engine, who, clock(), tag=q.tag, plate=q.plate, frame_no=q.frame_no,
            phone=q.phone, community=q.community, limit=page.limit, offset=page.offset,
            reason=q.reason)))

    @api.post("/vehicles", status_code=201)
    async def new_vehicle(body: NewVehicle, who: Principal = clerk) -> dict[str, Any]:
        tag = tag_of(body.tag)
        fields = body.model_dump(exclude={"owner"}) | {"tag": format_tag(tag)}
        owner = body.owner.model_dump() if body.owner else None
        await refusable(create_vehicle(engine, fields, owner))
        return await get_vehicle(engine, who, tag, clock(), "registered it")

    @api.get("/vehicles/export", response_model=None, responses=answers(CsvStream.media_type))
    async def vehicles_csv(who: Principal = clerk, reason: Reason = "") -> CsvStream:
        """Every vehicle with its owner, in the import's columns (one audit entry)."""
        return CsvStream(export_vehicles(engine, who, clock(), reason),
                         headers={"content-disposition": "attachment; filename=vehicles.csv"})

    @api.post("/vehicles/import", dependencies=[clerk], openapi_extra=_CSV_BODY)
    async def vehicles_import(request: Request) -> dict[str, Any]:
        """A CSV as `bikewatch vehicles import` takes it; a report per row."""
        text = await _csv(request)
        report = await refusable(import_vehicles(engine, text, settings.tz))
        return report.as_json()

    @api.get("/vehicles/{tag}")
    async def vehicle(tag: str, who: Principal = readers, reason: Reason = "",
                      ) -> dict[str, Any]:
        return await refusable(get_vehicle(engine, who, tag_of(tag), clock(), reason))

    @api.patch("/vehicles/{tag}")
    async def change_vehicle(tag: str, body: VehicleChange, who: Principal = clerk,
                             ) -> dict[str, Any]:
        value = tag_of(tag)
        changes = body.model_dump(exclude_unset=True, exclude={"owner"})
        owner = body.owner.model_dump() if body.owner else None
        await refusable(update_vehicle(engine, value, changes, owner))
        return await get_vehicle(engine, who, value, clock(), "changed it")

    # stations ------------------------------------------------------------------------
    @api.get("/stations")
    async def stations(page: Paged, who: Principal = field_ops,
                       zone: str | None = Query(None, pattern=NAME),
                       community: str | None = Query(None, pattern=NAME)) -> Rows:
        """Stations by id; a zone-limited police token sees its zones' only."""
        return page(await list_stations(engine, who, zone=zone, community=community,
                                        limit=page.limit, offset=page.offset))

    @api.get("/stations/export", response_model=None, dependencies=[ops],
             responses=answers(CsvStream.media_type))
    async def stations_csv() -> CsvStream:
        return CsvStream(export_stations(engine),
                         headers={"content-disposition": "attachment; filename=stations.csv"})

    @api.post("/stations/import", dependencies=[ops], openapi_extra=_CSV_BODY)
    async def stations_import(request: Request) -> dict[str, Any]:
        """A CSV as `bikewatch stations import` takes it; a report per row."""
        text = await _csv(request)
        return (await refusable(import_stations(engine, text, clock(), settings.tz))
                ).as_json()

    @api.get("/stations/{station_id}")
    async def station(station_id: str, who: Principal = field_ops) -> dict[str, Any]:
        return await refusable(get_station(engine, who, station_id))

    @api.put("/stations/{station_id}")
    async def put_station(station_id: str, body: StationIn, who: Principal = ops,
                          ) -> dict[str, Any]:
        """Create or change one station, as one CSV row would."""
        fields = body.model_dump(exclude_unset=True) | {"id": station_id}
        await refusable(save_station(engine, fields, clock()))
        return await get_station(engine, who, station_id)

    # cases ---------------------------------------------------------------------------
    @api.get("/cases")
    async def cases(page: Paged, who: Principal = case_desk,
                    status: str = Query("open", pattern="^(open|recovered|cancelled|all)$"),
                    ) -> Rows:
        """Cases with their latest alert, newest report first. A zone-limited token sees
        the cases with an alert in its zones."""
        return page(await list_cases(engine, status, page.limit, page.offset, who.zones))

    @api.post("/cases", status_code=201)
    async def open_case(body: NewCase, who: Principal = case_desk) -> dict[str, Any]:
        """A theft reported: the bike goes on the stolen list (workers within a second)."""
        now = clock()
        details = {k: v for k, v in _details(body).items() if v is not None}
        await refusable(report_theft(engine, tag_of(body.tag), body.case_id,
                                     now if body.stolen_ms is None else body.stolen_ms, now,
                                     body.actor(who), **details))
        return await _case(body.case_id, who)

    @api.get("/cases/{case_id}")
    async def case(case_id: str, who: Principal = case_desk) -> dict[str, Any]:
        """One case: its full trajectory since the theft, its alerts, who changed what."""
        return await _case(case_id, who)

    @api.patch("/cases/{case_id}")
    async def change_case(case_id: str, body: CaseDetails, who: Principal = case_desk,
                          ) -> dict[str, Any]:
        await _may_change(who, case_id=case_id)
        details = {k: ("" if v is None and k != "expires_ms" else v)
                   for k, v in _details(body).items()}
        await refusable(update_case(engine, case_id, details, clock(), body.actor(who),
                                    body.note))
        return await _case(case_id, who)

    @api.post("/cases/{case_id}/recover")
    async def recover(case_id: str, body: Recovery, who: Principal = case_desk,
                      ) -> dict[str, Any]:
        """The bike is back: no more alerts for this case."""
        await _may_change(who, case_id=case_id)
        result = await refusable(recover_theft(engine, case_id, clock(), body.actor(who),
                                               body.note, body.how))
        return {"case_id": case_id, "changed": result.changed, "message": result.message}

    @api.post("/cases/{case_id}/cancel")
    async def cancel(case_id: str, body: Actor, who: Principal = case_desk,
                     ) -> dict[str, Any]:
        """Reported in error: no more alerts for this case."""
        await _may_change(who, case_id=case_id)
        result = await refusable(cancel_case(engine, case_id, clock(), body.actor(who),
                                             body.note))
        return {"case_id": case_id, "changed": result.changed, "message": result.message}

    async def _may_change(who: Principal, **record: str) -> None:
        """A zone-limited token changes only what it can see; the rest is not found."""
        if not await visible(engine, who.zones, **record):
            what = record.get("case_id") or record.get("alert_id") or ""
            raise ApiError(404, f"unknown {next(iter(record))[:-3]} {what[:70]!r}")

    async def _case(case_id: str, who: Principal) -> dict[str, Any]:
        found = await case_detail(engine, case_id, who.zones)
        if found is None:
            raise ApiError(404, f"unknown case {case_id[:70]!r}")
        return found

    @api.post("/cases/{case_id}/ack")
    async def ack_case(case_id: str, body: Actor, who: Principal = police) -> dict[str, Any]:
        """A patrol takes the case on; it keeps raising alerts."""
        await _may_change(who, case_id=case_id)
        result = await refusable(acknowledge_case(engine, case_id, body.actor(who), clock(),
                                                  body.note))
        return {"case_id": case_id, "message": result.message}

    @api.post("/alerts/{alert_id}/ack")
    async def ack_alert(alert_id: str, body: Actor, who: Principal = police,
                        ) -> dict[str, Any]:
        await _may_change(who, alert_id=alert_id)
        case_id = await refusable(acknowledge_alert(engine, alert_id, body.actor(who),
                                                    clock(), body.note))
        return {"alert_id": alert_id, "case_id": case_id}

    # audit ---------------------------------------------------------------------------
    @api.get("/audit", dependencies=[admin])
    async def audit(page: Paged, actor: str | None = Query(None, max_length=100),
                    record: str | None = Query(None, max_length=100),
                    since_ms: int = Query(0, ge=0, le=2**53)) -> Rows:
        """Every read of unmasked personal data, newest first."""
        return page(await audit_log(engine, actor=actor, record=record, since_ms=since_ms,
                                    limit=page.limit, offset=page.offset))

    return api
