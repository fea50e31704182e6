"""Movement between two station visits (PROTOCOL.md section 3: speed_kmh, heading_deg)."""

from __future__ import annotations

import math

import numpy as np

EARTH_RADIUS_KM = 6371.0088  # mean radius (IUGG)


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance, haversine formula."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def distance_km_array(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray,
                      lon2: np.ndarray) -> np.ndarray:
    """`distance_km` over arrays (NaN where a coordinate is unknown)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(lon2 - lon1)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return np.asarray(2 * EARTH_RADIUS_KM * np.arcsin(np.minimum(1.0, np.sqrt(a))))


def bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial compass bearing from the first point to the second, 0 <= b < 360."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    x = math.sin(dl) * math.cos(p2)
    y = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(x, y)) % 360.0


def movement(prev: tuple[float | None, float | None, int, str],
             cur: tuple[float | None, float | None, int, str],
             ) -> tuple[float | None, float | None]:
    """(speed_kmh, heading_deg) from (lat, lon, time_ms, station) of the previous
    visit's end to the current visit's start; None where the contract says null."""
    lat1, lon1, t1, s1 = prev
    lat2, lon2, t2, s2 = cur
    if lat1 is None or lon1 is None or lat2 is None or lon2 is None or t2 - t1 <= 0:
        return None, None
    speed = distance_km(lat1, lon1, lat2, lon2) / ((t2 - t1) / 3_600_000)
    heading = None if s1 == s2 else bearing_deg(lat1, lon1, lat2, lon2)
    return round(speed, 1), None if heading is None else round(heading, 1)
