"""Theft cases: report, change, recover, cancel, acknowledge (PROTOCOL.md section 4,
`bikewatch theft`, and the HTTP API). Every change is a case event with who made it."""

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


DETAILS = ("place", "report_no", "police_unit", "notes", "expires_ms")
_LIMITS = {"place": 200, "report_no": 64, "police_unit": 100, "notes": 2000,
           "recovered_how": 200}


def _details(details: dict[str, Any]) -> dict[str, Any]:
    unknown = set(details) - set(DETAILS)
    if unknown:
        raise Invalid(f"a case has no field {sorted(unknown)[0]!r}")
    for name, value in details.items():
        if name in _LIMITS and len(value) > _LIMITS[name]:
            raise Invalid(f"{name} is at most {_LIMITS[name]} characters")
    return details


async def report_theft(engine: AsyncEngine, tag: int, case_id: str, stolen_ms: int,
                       now_ms: int, actor: str = "cli", **details: Any) -> CaseResult:
    """Open a case. Reporting the same open case again changes nothing. `details`:
    place, report_no, police_unit, notes, expires_ms."""
    if not NAME_RE.fullmatch(case_id):
        raise Invalid(f"bad case id {case_id[:70]!r}: use letters, digits, '.', '_' or '-'")
    if stolen_ms > now_ms + 60_000:
        raise Invalid("the theft time (--stolen-at) lies in the future")
    _details(details)
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
            reported_ms=now_ms, updates=0, **details))
        await _event(conn, case_id, now_ms, actor, "opened")
        await bump_version(conn)
    return CaseResult(case_id, tag, True,
                      f"case {case_id} opened: tag {format_tag(tag)} is on the stolen list")


async def recover_theft(engine: AsyncEngine, case_id: str, now_ms: int, actor: str = "cli",
                        note: str = "", how: str = "") -> CaseResult:
    """Close a case as recovered; it raises no more alerts. Idempotent."""
    if len(how) > _LIMITS["recovered_how"]:
        raise Invalid(f"how is at most {_LIMITS['recovered_how']} characters")
    return await _close(engine, case_id, "recovered", now_ms, actor, note,
                        {"recovered_how": how})


async def cancel_case(engine: AsyncEngine, case_id: str, now_ms: int, actor: str,
                      note: str = "") -> CaseResult:
    """Close a case reported in error (the bike was not stolen); no more alerts."""
    return await _close(engine, case_id, "cancelled", now_ms, actor, note, {})


async def _close(engine: AsyncEngine, case_id: str, status: str, now_ms: int, actor: str,
                 note: str, values: dict[str, Any]) -> CaseResult:
    async with engine.begin() as conn:
        row = await _case(conn, case_id)
        tag = from_db(row.tag)
        if row.status == status:
            return CaseResult(case_id, tag, False, f"case {case_id} is already {row.status}")
        if row.status != "open":
            raise Refused(f"case {case_id} is {row.status}; only an open case is {status}")
        await conn.execute(update(TheftCase).where(TheftCase.case_id == case_id)
                           .values(status=status, closed_ms=now_ms, **values))
        await _event(conn, case_id, now_ms, actor, status, note=note)
        await bump_version(conn)
    return CaseResult(case_id, tag, True,
                      f"case {case_id} {status}: tag {format_tag(tag)} is off the stolen list")


async def update_case(engine: AsyncEngine, case_id: str, changes: dict[str, Any],
                      now_ms: int, actor: str, note: str = "") -> CaseResult:
    """Change a case's details (place, report number, unit, notes, expiry). An open
    case's new expiry reaches the workers with the registry version."""
    _details(changes)
    async with engine.begin() as conn:
        row = await _case(conn, case_id)
        current = (await conn.execute(select(*(getattr(TheftCase, f) for f in changes))
                                      .where(TheftCase.case_id == case_id))).one()
        changed = {f: v for f, v in zip(changes, current, strict=True) if changes[f] != v}
        if not changed:
            return CaseResult(case_id, from_db(row.tag), False, f"case {case_id} unchanged")
        await conn.execute(update(TheftCase).where(TheftCase.case_id == case_id)
                           .values({f: changes[f] for f in changed}))
        await _event(conn, case_id, now_ms, actor, "updated",
                     note=(note or "changed " + ", ".join(changed))[:500])
        if "expires_ms" in changed and row.status == "open":
            await bump_version(conn)
    return CaseResult(case_id, from_db(row.tag), True,
                      f"case {case_id} updated: {', '.join(changed)}")


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
