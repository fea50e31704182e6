"""The station directory: what the pipeline and the alerts need to know of a station."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
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


def coordinates(names: Sequence[str], directory: Mapping[str, StationInfo],
                ) -> tuple[np.ndarray, np.ndarray]:
    """lat and lon arrays aligned with `names`, NaN where a station has no coordinates."""
    infos = [directory.get(n) for n in names]
    nan = float("nan")
    return (np.array([i.lat if i and i.lat is not None else nan for i in infos], float),
            np.array([i.lon if i and i.lon is not None else nan for i in infos], float))
