"""Theft cases: report and recover (PROTOCOL.md section 4, `bikewatch theft`)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.errors import Refused
from registry.imports import NAME_RE, bump_version
from registry.models import TheftCase, Vehicle
from registry.tags import format_tag, from_db, to_db


@dataclass(slots=True, frozen=True)
class CaseResult:
    case_id: str
    tag: int
    changed: bool
    message: str


async def report_theft(engine: AsyncEngine, tag: int, case_id: str, stolen_ms: int,
                       now_ms: int) -> CaseResult:
    """Open a case. Reporting the same open case again changes nothing."""
    if not NAME_RE.fullmatch(case_id):
        raise Refused(f"bad case id {case_id[:70]!r}: use letters, digits, '.', '_' or '-'")
    if stolen_ms > now_ms + 60_000:
        raise Refused("--stolen-at lies in the future")
    async with engine.begin() as conn:
        registered = await conn.execute(select(Vehicle.tag).where(Vehicle.tag == to_db(tag)))
        if registered.first() is None:
            raise Refused(f"tag {format_tag(tag)} is not registered")
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
        await bump_version(conn)
    return CaseResult(case_id, tag, True,
                      f"case {case_id} opened: tag {format_tag(tag)} is on the stolen list")


async def recover_theft(engine: AsyncEngine, case_id: str, now_ms: int) -> CaseResult:
    """Close a case as recovered; it raises no more alerts. Idempotent."""
    async with engine.begin() as conn:
        row = (await conn.execute(select(TheftCase.tag, TheftCase.status)
                                  .where(TheftCase.case_id == case_id))).first()
        if row is None:
            raise Refused(f"unknown case {case_id[:70]!r}")
        tag = from_db(row.tag)
        if row.status != "open":
            return CaseResult(case_id, tag, False, f"case {case_id} is already {row.status}")
        await conn.execute(update(TheftCase).where(TheftCase.case_id == case_id)
                           .values(status="recovered", closed_ms=now_ms))
        await bump_version(conn)
    return CaseResult(case_id, tag, True,
                      f"case {case_id} recovered: tag {format_tag(tag)} is off the stolen list")
