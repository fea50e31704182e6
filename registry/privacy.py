"""Personal data: who sees an owner, masked or not, and the audit of every unmasked read.

Only `police` and `clerk` principals see an owner at all; they see it whole, and
each record so shown is written to the audit log in the same transaction as
the read, so that no unmasked read goes unrecorded. Alerts carry the owner
masked (`138****1234`) unless the receiving channel is configured for full
contact. No full phone or ID number is ever logged or used as a metric label.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from registry.models import AuditEntry
from registry.normalize import mask_name, mask_phone
from registry.tokens import Principal

PII_ROLES = frozenset({"police", "clerk"})
READ = "read_personal_data"
EXPORT = "export_personal_data"


def sees_owner(who: Principal) -> bool:
    return who.role in PII_ROLES


def owner_full(name: str, phone: str, id_number: str) -> dict[str, str]:
    return {"name": name, "phone": phone, "id_number": id_number}


def owner_masked(name: str, phone: str) -> dict[str, str]:
    """What an alert carries by default: enough to call back, not enough to misuse."""
    return {"name": mask_name(name), "phone": mask_phone(phone)}


async def audit(conn: AsyncConnection, who: Principal, records: Iterable[str], now_ms: int,
                reason: str = "", action: str = READ) -> None:
    """One audit row per record read unmasked (`vehicle:00a1b2c3`, `case:LH-1`)."""
    rows = [{"at_ms": now_ms, "actor": who.name[:100], "role": who.role, "action": action,
             "record": r[:100], "reason": reason[:500]} for r in records]
    if rows:
        await conn.execute(insert(AuditEntry), rows)


async def audit_log(engine: AsyncEngine, *, actor: str | None = None,
                    record: str | None = None, since_ms: int = 0, limit: int = 100,
                    offset: int = 0) -> list[dict[str, Any]]:
    """The audit log, newest first."""
    q = (select(AuditEntry).where(AuditEntry.at_ms >= since_ms)
         .order_by(AuditEntry.id.desc()).limit(limit).offset(offset))
    if actor is not None:
        q = q.where(AuditEntry.actor == actor)
    if record is not None:
        q = q.where(AuditEntry.record == record)
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    return [{"at_ms": r.at_ms, "actor": r.actor, "role": r.role, "action": r.action,
             "record": r.record, "reason": r.reason} for r in rows]
