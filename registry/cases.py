"""Theft cases: report and recover (PROTOCOL.md section 4, `bikewatch theft`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from registry.errors import Invalid, NotFound, Refused
from registry.imports import NAME_RE, bump_version
from registry.models import Alert, CaseEvent, TheftCase, Vehicle
from registry.tags import format_tag, from_db, to_db


@dataclass(slots=True, frozen=True)
class CaseResult:
    case_id: str
    tag: int
    changed: bool
    message: str


async def report_theft(engine: AsyncEngine, tag: int, case_id: str, stolen_ms: int,
                       now_ms: int, actor: str = "cli") -> CaseResult:
    """Open a case. Reporting the same open case again changes nothing."""
    if not NAME_RE.fullmatch(case_id):
        raise Invalid(f"bad case id {case_id[:70]!r}: use letters, digits, '.', '_' or '-'")
    if stolen_ms > now_ms + 60_000:
        raise Invalid("--stolen-at lies in the future")
    async with engine.begin() as conn:
        registered = await conn.execute(select(Vehicle.tag).where(Vehicle.tag == to_db(tag)))
        if registered.first() is None:
            raise NotFound(f"tag {format_tag(tag)} is not registered")
        same = (await conn.execute(select(TheftCase.tag, TheftCase.status)
                                   .where(TheftCase.case_id == case_id))).first()
        if same is not None:
            if from_db(same.tag) != tag:
                raise Refused(f"case {case_id} exists for another tag, "
                              f"{format_tag(from_db(same.tag))}")
            if same.status == "open":
                return CaseResult(case_id, tag, False, f"case {case_id} is already open")
            raise Refused(f"case {case_id} was closed ({same.status}); open a new case id")
        other = (await conn.execute(select(TheftCase.case_id).where(
            TheftCase.tag == to_db(tag), TheftCase.status == "open"))).scalar()
        if other is not None:
            raise Refused(f"tag {format_tag(tag)} is already reported stolen under case {other}")
        await conn.execute(insert(TheftCase).values(
            case_id=case_id, tag=to_db(tag), status="open", stolen_ms=stolen_ms,
            reported_ms=now_ms, updates=0))
        await _event(conn, case_id, now_ms, actor, "opened")
        await bump_version(conn)
    return CaseResult(case_id, tag, True,
                      f"case {case_id} opened: tag {format_tag(tag)} is on the stolen list")


async def recover_theft(engine: AsyncEngine, case_id: str, now_ms: int, actor: str = "cli",
                        note: str = "") -> CaseResult:
    """Close a case as recovered; it raises no more alerts. Idempotent."""
    async with engine.begin() as conn:
        row = await _case(conn, case_id)
        tag = from_db(row.tag)
        if row.status != "open":
            return CaseResult(case_id, tag, False, f"case {case_id} is already {row.status}")
        await conn.execute(update(TheftCase).where(TheftCase.case_id == case_id)
                           .values(status="recovered", closed_ms=now_ms))
        await _event(conn, case_id, now_ms, actor, "recovered", note=note)
        await bump_version(conn)
    return CaseResult(case_id, tag, True,
                      f"case {case_id} recovered: tag {format_tag(tag)} is off the stolen list")


async def acknowledge_case(engine: AsyncEngine, case_id: str, actor: str, now_ms: int,
                           note: str = "") -> CaseResult:
    """A patrol takes the case on. It keeps raising alerts; recording who and when."""
    async with engine.begin() as conn:
        row = await _case(conn, case_id)
        if row.status != "open":
            raise Refused(f"case {case_id} is {row.status}; only an open case is acknowledged")
        await conn.execute(update(TheftCase).where(TheftCase.case_id == case_id)
                           .values(acked_ms=now_ms, acked_by=actor))
        await _event(conn, case_id, now_ms, actor, "acknowledged", note=note)
    return CaseResult(case_id, from_db(row.tag), True,
                      f"case {case_id} acknowledged by {actor}")


async def acknowledge_alert(engine: AsyncEngine, alert_id: str, actor: str, now_ms: int,
                            note: str = "") -> str | None:
    """Mark one alert seen by a patrol; returns its case (None for a bike with no case)."""
    async with engine.begin() as conn:
        row = (await conn.execute(select(Alert.case_id)
                                  .where(Alert.alert_id == alert_id))).first()
        if row is None:
            raise NotFound(f"unknown alert {alert_id[:40]!r}")
        await conn.execute(update(Alert).where(Alert.alert_id == alert_id)
                           .values(acked_ms=now_ms, acked_by=actor))
        case_id = row.case_id or None
        await _event(conn, case_id, now_ms, actor, "acknowledged", alert_id=alert_id, note=note)
    return case_id


async def _case(conn: AsyncConnection, case_id: str) -> Any:
    """The case's tag and status; Refused if there is no such case."""
    row = (await conn.execute(select(TheftCase.tag, TheftCase.status)
                              .where(TheftCase.case_id == case_id))).first()
    if row is None:
        raise NotFound(f"unknown case {case_id[:70]!r}")
    return row


async def _event(conn: AsyncConnection, case_id: str | None, at_ms: int, actor: str,
                 action: str, *, alert_id: str | None = None, note: str = "") -> None:
    await conn.execute(insert(CaseEvent).values(case_id=case_id, at_ms=at_ms,
                                                actor=actor[:100], action=action,
                                                alert_id=alert_id, note=note[:500]))
