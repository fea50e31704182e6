"""The station directory: what the pipeline and the alerts need to know of a station."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from registry.models import Station

UNASSIGNED = "unassigned"


@dataclass(slots=True, frozen=True)
class StationInfo:
    id: str
    name: str
    lat: float | None
    lon: float | None
    zone: str
    imported: bool
    imported_ms: int | None = None
    timeout_s: float | None = None  # None: the zone's, else the fleet default

    @classmethod
    def unknown(cls, station: str) -> StationInfo:
        """A station heard from but never imported (PROTOCOL.md section 1)."""
        return cls(station, "", None, None, UNASSIGNED, False)

    def as_alert(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "lat": self.lat, "lon": self.lon,
                "zone": self.zone}


async def load_directory(conn: AsyncConnection) -> dict[str, StationInfo]:
    rows = await conn.execute(select(Station.id, Station.name, Station.lat, Station.lon,
                                     Station.zone, Station.imported, Station.imported_ms,
                                     Station.timeout_s))
    return {r.id: StationInfo(r.id, r.name, r.lat, r.lon,
                              r.zone if r.imported else UNASSIGNED, r.imported, r.imported_ms,
                              r.timeout_s)
            for r in rows}
