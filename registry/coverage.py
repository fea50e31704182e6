"""Registration coverage, the towns' other figure: per community, the vehicles
registered, those heard by a station in the window, and the unknown tags heard
(read by the community's stations but not in the registry: unregistered bikes or
counterfeit tags). A vehicle counts in its own community; an unknown tag in the
community of each station that heard it, and once in the town's total."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import distinct, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.models import Station, Vehicle, Visit

NONE = "(none)"  # vehicles or stations without a community


@dataclass(slots=True, frozen=True)
class CommunityCoverage:
    community: str
    registered: int
    heard: int
    unknown_tags: int

    @property
    def heard_ratio(self) -> float | None:
        return self.heard / self.registered if self.registered else None


@dataclass(slots=True, frozen=True)
class Coverage:
    from_ms: int
    to_ms: int
    communities: list[CommunityCoverage]
    registered: int
    heard: int
    unknown_tags: int  # distinct over the town


async def coverage_report(engine: AsyncEngine, from_ms: int, to_ms: int) -> Coverage:
    recent = (Visit.last_ms >= from_ms) & (Visit.first_ms <= to_ms)
    community = func.coalesce(Vehicle.community, NONE)
    where = func.coalesce(Station.community, NONE)
    unknown = (select(Visit.tag, Visit.station).outerjoin(Vehicle, Vehicle.tag == Visit.tag)
               .where(recent, Vehicle.tag.is_(None)).subquery())
    async with engine.connect() as conn:
        registered = dict((await conn.execute(
            select(community, func.count()).group_by(community))).all())
        heard = dict((await conn.execute(
            select(community, func.count(distinct(Vehicle.tag)))
            .join(Visit, Visit.tag == Vehicle.tag).where(recent).group_by(community)
        )).all())
        strangers = dict((await conn.execute(
            select(where, func.count(distinct(unknown.c.tag)))
            .select_from(unknown).outerjoin(Station, Station.id == unknown.c.station)
            .group_by(where))).all())
        total_strangers = (await conn.execute(
            select(func.count(distinct(unknown.c.tag))))).scalar_one()
    names = sorted(set(registered) | set(heard) | set(strangers))
    rows = [CommunityCoverage(n, registered.get(n, 0), heard.get(n, 0), strangers.get(n, 0))
            for n in names]
    return Coverage(from_ms, to_ms, rows, sum(registered.values()), sum(heard.values()),
                    int(total_strangers))
