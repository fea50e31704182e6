"""Read-only queries shared by the command line and the HTTP API."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import ColumnElement, exists, func, select, true, update
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.db import reading
from registry.models import Alert, CaseEvent, Delivery, RejectRecord, Station, TheftCase, Visit
from registry.tags import format_tag, from_db, to_db


async def list_rejects(engine: AsyncEngine, limit: int = 50, reason: str | None = None,
                       station: str | None = None, offset: int = 0) -> list[dict[str, Any]]:
    """Newest first, with the first bytes of each payload shown safely."""
    q = select(RejectRecord).order_by(RejectRecord.id.desc()).limit(limit).offset(offset)
    if reason:
        q = q.where(RejectRecord.reason == reason)
    if station:
        q = q.where(RejectRecord.station == station)
    async with reading(engine).connect() as conn:
        rows = (await conn.execute(q)).all()
    return [{"received_ms": r.received_ms, "station": r.station, "reason": r.reason,
             "reads": r.reads, "detail": r.detail, "boot": r.boot, "seq": r.seq,
             "payload_bytes": len(r.payload), "payload_prefix": r.payload[:120].decode(
                 "utf-8", "backslashreplace")} for r in rows]


async def count_rejects(engine: AsyncEngine) -> int:
    async with reading(engine).connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(RejectRecord)))
                   .scalar_one())


async def trajectory(engine: AsyncEngine, tag: int, since_ms: int = 0,
                     limit: int = 1000) -> list[dict[str, Any]]:
    """A tag's station visits since `since_ms`, oldest first."""
    async with reading(engine).connect() as conn:
        rows = (await conn.execute(
            select(Visit.station, Visit.first_ms, Visit.last_ms, Visit.reads, Visit.best_rssi,
                   Station.name, Station.lat, Station.lon, Station.zone)
            .join(Station, Station.id == Visit.station, isouter=True)
            .where(Visit.tag == to_db(tag), Visit.last_ms >= since_ms)
            .order_by(Visit.first_ms).limit(limit))).all()
    return [{"station": r.station, "name": r.name or "", "lat": r.lat, "lon": r.lon,
             "zone": r.zone or "unassigned", "first_ms": r.first_ms, "last_ms": r.last_ms,
             "reads": r.reads, "best_rssi": r.best_rssi} for r in rows]


DELIVERY_STATES = ("pending", "delivered", "dead")


async def outbox_backlog(engine: AsyncEngine) -> tuple[dict[str, int], dict[str, int]]:
    """Per channel (`mqtt`, `webhook/NAME`): alerts not yet delivered, and the oldest one's
    raise (or creation) time."""
    async with reading(engine).connect() as conn:
        mqtt = (await conn.execute(select(func.count(), func.min(Alert.raised_ms))
                                   .where(Alert.published_ms.is_(None)))).one()
        hooks = (await conn.execute(
            select(Delivery.channel, func.count(), func.min(Delivery.created_ms))
            .where(Delivery.delivered_ms.is_(None), Delivery.dead_ms.is_(None))
            .group_by(Delivery.channel))).all()
    depth = {"mqtt": int(mqtt[0])} | {f"webhook/{c}": int(n) for c, n, _ in hooks}
    oldest = {"mqtt": mqtt[1]} if mqtt[1] is not None else {}
    oldest |= {f"webhook/{c}": int(t) for c, _, t in hooks}
    return depth, oldest


async def list_deliveries(engine: AsyncEngine, state: str | None = None,
                          webhook: str | None = None, limit: int = 50, offset: int = 0,
                          ) -> list[dict[str, Any]]:
    """Webhook deliveries, newest alert first."""
    q = (select(Delivery.alert_id, Delivery.channel, Delivery.attempts, Delivery.created_ms,
                Delivery.next_ms, Delivery.delivered_ms, Delivery.dead_ms, Delivery.last_error,
                Alert.kind, Alert.case_id, Alert.zone)
         .join(Alert, Alert.alert_id == Delivery.alert_id)
         .order_by(Delivery.id.desc()).limit(limit).offset(offset))
    if webhook:
        q = q.where(Delivery.channel == webhook)
    if state == "pending":
        q = q.where(Delivery.delivered_ms.is_(None), Delivery.dead_ms.is_(None))
    elif state == "delivered":
        q = q.where(Delivery.delivered_ms.is_not(None))
    elif state == "dead":
        q = q.where(Delivery.dead_ms.is_not(None))
    async with reading(engine).connect() as conn:
        rows = (await conn.execute(q)).all()
    return [{"alert_id": r.alert_id, "webhook": r.channel, "kind": r.kind,
             "case_id": r.case_id, "zone": r.zone, "attempts": r.attempts,
             "state": "delivered" if r.delivered_ms else "dead" if r.dead_ms else "pending",
             "created_ms": r.created_ms, "next_ms": r.next_ms, "delivered_ms": r.delivered_ms,
             "dead_ms": r.dead_ms, "last_error": r.last_error} for r in rows]


async def requeue_dead(engine: AsyncEngine, now_ms: int, webhook: str | None = None) -> int:
    """Dead letters back to pending, from now on: for a receiver that is back for good.
    Their age restarts, so they are retried for another `webhook_max_age_s`."""
    q = (update(Delivery).where(Delivery.dead_ms.is_not(None))
         .values(dead_ms=None, next_ms=now_ms, created_ms=now_ms))
    if webhook:
        q = q.where(Delivery.channel == webhook)
    async with engine.begin() as conn:
        return int((await conn.execute(q)).rowcount)


CASE_STATES = ("open", "recovered", "cancelled", "all")


def _case(r: Any) -> dict[str, Any]:
    return {"case_id": r.case_id, "tag": format_tag(from_db(r.tag)), "status": r.status,
            "stolen_ms": r.stolen_ms, "reported_ms": r.reported_ms, "closed_ms": r.closed_ms,
            "updates": r.updates, "acked_ms": r.acked_ms, "acked_by": r.acked_by,
            "place": r.place, "report_no": r.report_no, "police_unit": r.police_unit,
            "notes": r.notes, "expires_ms": r.expires_ms, "recovered_how": r.recovered_how}


def _in_zones(zones: Collection[str] | None) -> ColumnElement[bool]:
    """A case seen in one of `zones` (an alert raised there); every case for None."""
    if zones is None:
        return true()
    return exists().where(Alert.case_id == TheftCase.case_id, Alert.zone.in_(zones))


def _alert(r: Any) -> dict[str, Any]:
    return {"alert_id": r.alert_id, "kind": r.kind, "station": r.station, "zone": r.zone,
            "update": r.update_no or None, "seen_ms": r.visit_first_ms,
            "raised_ms": r.raised_ms, "published_ms": r.published_ms, "acked_ms": r.acked_ms,
            "acked_by": r.acked_by}


async def list_cases(engine: AsyncEngine, status: str = "open", limit: int = 100,
                     offset: int = 0, zones: Collection[str] | None = None,
                     ) -> list[dict[str, Any]]:
    """Cases, newest report first, each with its latest alert; with `zones`, those
    seen there only."""
    q = (select(TheftCase).where(_in_zones(zones))
         .order_by(TheftCase.reported_ms.desc(), TheftCase.case_id).limit(limit).offset(offset))
    if status != "all":
        q = q.where(TheftCase.status == status)
    async with reading(engine).connect() as conn:
        cases = (await conn.execute(q)).all()
        ids = [c.case_id for c in cases]
        newest = (select(Alert.case_id, func.max(Alert.raised_ms).label("raised"))
                  .where(Alert.case_id.in_(ids)).group_by(Alert.case_id).subquery())
        latest = {r.case_id: r for r in (await conn.execute(
            select(Alert).join(newest, (Alert.case_id == newest.c.case_id)
                               & (Alert.raised_ms == newest.c.raised)))).all()}
    return [_case(c) | {"latest_alert": _alert(latest[c.case_id])
                        if c.case_id in latest else None} for c in cases]


async def visible(engine: AsyncEngine, zones: Collection[str] | None, *,
                  case_id: str | None = None, alert_id: str | None = None) -> bool:
    """Whether a token limited to `zones` may see this case (an alert of it raised in
    one of them) or this alert (raised in one); True for every record without a limit,
    and for a record that does not exist (the change then answers not found)."""
    if zones is None:
        return True
    async with reading(engine).connect() as conn:
        if case_id is not None:
            q = select(TheftCase.case_id).where(TheftCase.case_id == case_id)
            if (await conn.execute(q)).first() is None:
                return True
            return (await conn.execute(q.where(_in_zones(zones)))).first() is not None
        row = (await conn.execute(select(Alert.zone).where(Alert.alert_id == alert_id))
               ).first()
        return row is None or row.zone in zones


async def case_detail(engine: AsyncEngine, case_id: str,
                      zones: Collection[str] | None = None) -> dict[str, Any] | None:
    """A case with its full trajectory since the theft, its alerts and who changed what;
    None if there is no such case (or it was not seen in `zones`)."""
    async with reading(engine).connect() as conn:
        case = (await conn.execute(select(TheftCase).where(TheftCase.case_id == case_id,
                                                           _in_zones(zones)))).first()
        if case is None:
            return None
        alerts = (await conn.execute(select(Alert).where(Alert.case_id == case_id)
                                     .order_by(Alert.raised_ms))).all()
        if zones is not None:  # a zone-limited token sees its zones' alerts and stations
            alerts = [a for a in alerts if a.zone in zones]
        events = (await conn.execute(select(CaseEvent).where(CaseEvent.case_id == case_id)
                                     .order_by(CaseEvent.id))).all()
    path = await trajectory(engine, from_db(case.tag), case.stolen_ms, limit=10_000)
    if zones is not None:
        path = [v for v in path if v["zone"] in zones]
    return _case(case) | {
        "trajectory": path, "alerts": [_alert(a) for a in alerts],
        "events": [{"at_ms": e.at_ms, "actor": e.actor, "action": e.action,
                    "alert_id": e.alert_id, "note": e.note} for e in events]}
