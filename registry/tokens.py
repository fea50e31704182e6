"""API tokens and their roles (`bikewatch token`, `/api/v1/tokens`).

A token is `bw_` and 32 random bytes, shown once. The database keeps its SHA-256:
the secret has 256 bits of entropy, so a slow password hash would add nothing
but latency to every request.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.db import reading
from registry.errors import Invalid, NotFound, Refused
from registry.imports import NAME_RE
from registry.models import ApiToken

ROLES = ("clerk", "police", "ops", "admin")
PREFIX = "bw_"


@dataclass(slots=True, frozen=True)
class Principal:
    """Who calls: the token's name and role, and the zones a police token is limited
    to (None: every zone)."""

    name: str
    role: str
    zones: frozenset[str] | None = None

    def sees_zone(self, zone: str) -> bool:
        return self.zones is None or zone in self.zones


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _zones(text: str) -> frozenset[str] | None:
    return frozenset(text.split(",")) if text else None


async def create_token(engine: AsyncEngine, role: str, name: str, now_ms: int,
                       zones: list[str] | None = None) -> str:
    """A new token's secret (shown once). Zones limit a police token."""
    if role not in ROLES:
        raise Invalid(f"unknown role {role[:20]!r}; use one of {', '.join(ROLES)}")
    if not 0 < len(name) <= 100 or not name.isprintable():
        raise Invalid("a token's name is 1 to 100 printable characters")
    zones = sorted(set(zones or ()))
    if zones and role != "police":
        raise Invalid("only a police token is limited to zones")
    bad = [z for z in zones if not NAME_RE.fullmatch(z)]
    if bad:
        raise Invalid(f"bad zone {bad[0][:70]!r}")
    secret = PREFIX + secrets.token_urlsafe(32)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(ApiToken).values(
                name=name, role=role, zones=",".join(zones), secret_sha256=digest(secret),
                created_ms=now_ms))
    except IntegrityError:
        raise Refused(f"a token named {name!r} exists; revoke it or choose another name"
                      ) from None
    return secret


async def revoke_token(engine: AsyncEngine, name: str, now_ms: int) -> bool:
    """Revoke by name; False if it was already revoked. Refused if there is none."""
    async with engine.begin() as conn:
        row = (await conn.execute(select(ApiToken.revoked_ms)
                                  .where(ApiToken.name == name))).first()
        if row is None:
            raise NotFound(f"no token named {name[:100]!r}")
        if row.revoked_ms is not None:
            return False
        await conn.execute(update(ApiToken).where(ApiToken.name == name)
                           .values(revoked_ms=now_ms))
    return True


async def list_tokens(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(ApiToken.name, ApiToken.role, ApiToken.zones,
                                         ApiToken.created_ms, ApiToken.revoked_ms)
                                  .order_by(ApiToken.id))
        return [{"name": r.name, "role": r.role, "zones": r.zones.split(",") if r.zones else [],
                 "created_ms": r.created_ms, "revoked_ms": r.revoked_ms} for r in rows]


async def authenticate(engine: AsyncEngine, secret: str) -> Principal | None:
    """The principal of a live token; None for an unknown or revoked one."""
    if not secret.startswith(PREFIX) or len(secret) > 100:
        return None
    async with reading(engine).connect() as conn:
        row = (await conn.execute(select(ApiToken.name, ApiToken.role, ApiToken.zones)
                                  .where(ApiToken.secret_sha256 == digest(secret),
                                         ApiToken.revoked_ms.is_(None)))).first()
    return None if row is None else Principal(row.name, row.role, _zones(row.zones))
