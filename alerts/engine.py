"""Raising `stolen_sighting` alerts (PROTOCOL.md section 3), inside the group's transaction.

One alert per station visit: the alert row's unique key is (case, kind,
station, visit start), so a repeated batch, a retried transaction or a second
worker cannot raise it twice. `update` counts the case's alerts in the case
row, in the same transaction. The alert row doubles as the outbox entry until
it is published (DESIGN.md decision 4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from alerts.geo import movement
from alerts.ids import new_ulid
from registry.models import Alert, Delivery, Owner, TheftCase, Vehicle, Visit
from registry.privacy import owner_masked
from registry.snapshot import live_case
from registry.sql import insert_ignore
from registry.stations import StationInfo
from registry.tags import format_tag, from_db, to_db

KIND_STOLEN = "stolen_sighting"
KIND_TAMPER = "tamper"                    # a registered bike's tag reports the tamper flag
KIND_IMPOSSIBLE = "impossible_travel"     # heard at two stations too far apart: a cloned tag
KINDS = (KIND_STOLEN, KIND_TAMPER, KIND_IMPOSSIBLE)

NextStations = Callable[[str | None, str], list[str]]

# The statements of every alert, built once (registry.sql's note says why).
_COUNT_CASE = (
    update(TheftCase)
    .where(TheftCase.case_id == bindparam("p_case"), TheftCase.status == "open",
           live_case(bindparam("p_now", type_=TheftCase.expires_ms.type)))
    .values(updates=TheftCase.updates + 1).returning(TheftCase.updates))
_UNCOUNT_CASE = (update(TheftCase).where(TheftCase.case_id == bindparam("p_case"))
                 .values(updates=TheftCase.updates - 1))
_VISITS_SINCE = (
    select(Visit.station, Visit.first_ms, Visit.last_ms)
    .where(Visit.tag == bindparam("p_tag"), Visit.last_ms >= bindparam("p_since"),
           Visit.first_ms <= bindparam("p_until"))
    .order_by(Visit.first_ms, Visit.last_ms))
_VEHICLES = (select(Vehicle.tag, Vehicle.plate, Vehicle.brand, Vehicle.color, Owner.name,
                    Owner.phone).outerjoin(Owner, Owner.id == Vehicle.owner_id))
_LOAD_CHUNK = 500  # tags a statement in `Vehicles.load`
_QUEUE_DELIVERY = insert(Delivery)


@dataclass(slots=True, frozen=True)
class Sighting:
    """A stolen tag's visit, as the pipeline hands it over."""

    case_id: str
    tag: int
    station: str
    visit_first_ms: int
    stolen_ms: int
    received_ms: int


@dataclass(slots=True, frozen=True)
class RaisedAlert:
    alert_id: str
    zone: str
    payload: bytes
    received_ms: int
    kind: str = KIND_STOLEN
    committed_ms: int = 0  # when its transaction committed, where the hot path raised it


class Vehicles:
    """The alerts' `vehicle` and masked `owner` by tag, kept for one registry version.

    A stolen bike raises an alert at station after station, and a look-up per alert
    was one of six round trips to the database that each alert waited for; every
    change to a vehicle or its owner bumps the version (registry.imports.bump_version),
    and `at_version` forgets them all then."""

    MOST = 10_000

    def __init__(self) -> None:
        self._version = -1
        self._cards: dict[int, tuple[dict[str, str] | None, dict[str, str] | None]] = {}

    def at_version(self, version: int) -> None:
        if version != self._version:
            self._version = version
            self._cards.clear()

    def get(self, conn: Connection, tag: int,
            ) -> tuple[dict[str, str] | None, dict[str, str] | None]:
        card = self._cards.get(tag)
        if card is None:
            card = _cards(conn, [tag])[tag]
            if len(self._cards) >= self.MOST:
                self._cards.clear()
            self._cards[tag] = card
        return card

    async def load(self, conn: AsyncConnection, version: int, tags: Sequence[int]) -> None:
        """Fetch the cards of `tags` (up to `MOST` held in all) for registry `version`, a
        few hundred a statement. The refresher does this for the open cases when a new
        snapshot comes in, off the hot path: a case's first alert, the one police need
        soonest, then makes no trip for its card (with 1,000 open cases, most alerts
        of the bench's half-load run were a case's first)."""
        self.at_version(version)
        wanted = [t for t in tags if t not in self._cards][:max(0, self.MOST - len(self._cards))]
        for start in range(0, len(wanted), _LOAD_CHUNK):
            chunk = wanted[start:start + _LOAD_CHUNK]
            found = await conn.run_sync(_cards, chunk)
            if self._version != version:  # a newer version came in meanwhile: its own turn
                return
            self._cards.update(found)


def raise_alert(conn: Connection, s: Sighting, stations: Mapping[str, StationInfo],
                now_ms: int, late_after_ms: int, vehicles: Vehicles,
                webhooks: Callable[[str], Sequence[str]] = lambda _zone: (),
                forecast: NextStations = lambda _previous, _current: [],
                ) -> RaisedAlert | None:
    """The new alert for this visit, or None if it was raised before or the case closed.
    `forecast(previous station, station)` ranks `next_stations` (alerts.forecast).
    `webhooks(zone)` names the webhooks that take the zone's alerts: each gets a delivery
    row in this transaction, so a crash cannot lose it (alerts.webhook sends them).

    Three round trips (four with webhooks), each waited for by the alert: the case is
    counted first and given back in the rare event that the alert's unique key shows
    it raised before (a repeated batch, another worker), all in this transaction.
    A plain function: the hot path runs its whole transaction in one go
    (registry.db.in_transaction)."""
    station = stations.get(s.station) or StationInfo.unknown(s.station)
    counted = (conn.execute(_COUNT_CASE, {"p_case": s.case_id, "p_now": now_ms})).first()
    if counted is None:  # closed or expired between the snapshot and now: no alert
        return None
    visits = (conn.execute(_VISITS_SINCE, {
        "p_tag": to_db(s.tag), "p_since": s.stolen_ms, "p_until": s.visit_first_ms})).all()
    vehicle, owner = vehicles.get(conn, s.tag)
    trajectory = _trajectory(visits, s, stations)
    prev = trajectory[-2] if len(trajectory) > 1 else None
    speed, heading = (None, None) if prev is None else movement(
        (prev["lat"], prev["lon"], prev["last_ms"], prev["station"]),
        (station.lat, station.lon, s.visit_first_ms, s.station))
    alert_id = new_ulid(now_ms)
    doc: dict[str, Any] = {
        "v": 1, "alert_id": alert_id, "kind": KIND_STOLEN, "case_id": s.case_id,
        "update": counted.updates, "tag": format_tag(s.tag),
        "vehicle": vehicle, "owner": owner,
        "station": station.as_alert(),
        "seen_ms": s.visit_first_ms, "raised_ms": now_ms,
        "late": now_ms - s.visit_first_ms > late_after_ms,
        "trajectory": trajectory, "speed_kmh": speed, "heading_deg": heading,
        "next_stations": forecast(prev["station"] if prev else None, s.station),
    }
    payload = orjson.dumps(doc)
    inserted = conn.execute(insert_ignore(conn, Alert, Alert.alert_id), {
        "alert_id": alert_id, "kind": KIND_STOLEN, "case_id": s.case_id, "tag": to_db(s.tag),
        "station": s.station, "zone": station.zone, "visit_first_ms": s.visit_first_ms,
        "update_no": counted.updates, "raised_ms": now_ms, "received_ms": s.received_ms,
        "payload": payload.decode()})
    if inserted.first() is None:  # raised before: the count goes back
        conn.execute(_UNCOUNT_CASE, {"p_case": s.case_id})
        return None
    _queue_deliveries(conn, alert_id, webhooks(station.zone), now_ms)
    return RaisedAlert(alert_id, station.zone, payload, s.received_ms)


def _queue_deliveries(conn: Connection, alert_id: str, channels: Sequence[str],
                      now_ms: int) -> None:
    """One delivery row per webhook, in the alert's transaction (alerts.webhook)."""
    if channels:
        conn.execute(_QUEUE_DELIVERY, [
            {"alert_id": alert_id, "channel": name, "created_ms": now_ms, "next_ms": now_ms,
             "attempts": 0, "last_error": ""} for name in channels])


def _trajectory(visits: Any, s: Sighting, stations: Mapping[str, StationInfo],
                ) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for v in visits:
        info = stations.get(v.station) or StationInfo.unknown(v.station)
        entry = {"station": v.station, "lat": info.lat, "lon": info.lon,
                 "first_ms": v.first_ms, "last_ms": v.last_ms}
        if v.station == s.station and v.first_ms == s.visit_first_ms:
            current = entry
        else:
            out.append(entry)
    if current is not None:  # the contract: the last entry is the current visit
        out.append(current)
    return out


@dataclass(slots=True, frozen=True)
class Flagged:
    """A registered bike's visit that raises an alert of another kind."""

    kind: str
    tag: int
    station: str
    visit_first_ms: int
    received_ms: int
    case_id: str | None = None   # the open case, when the bike is stolen
    prev: tuple[str, int, int] | None = None  # the visit before: station, first_ms, last_ms


def _cards(conn: Connection, tags: Sequence[int],
           ) -> dict[int, tuple[dict[str, str] | None, dict[str, str] | None]]:
    """Each tag's `vehicle`, and its `owner` masked (`registry.privacy`), (None, None)
    for a tag not registered: a channel configured for full contact gets the owner
    filled in when it is sent."""
    rows = conn.execute(_VEHICLES.where(Vehicle.tag.in_([to_db(t) for t in tags])))
    found = {from_db(r.tag): _card(r) for r in rows}
    return {t: found.get(t, (None, None)) for t in tags}


def _card(r: Any) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    owner = owner_masked(r.name, r.phone) if r.name or r.phone else None
    return {"plate": r.plate, "brand": r.brand, "color": r.color}, owner


def raise_flagged(conn: Connection, f: Flagged, stations: Mapping[str, StationInfo],
                  now_ms: int, late_after_ms: int, vehicles: Vehicles,
                  webhooks: Callable[[str], Sequence[str]] = lambda _zone: (),
                  ) -> RaisedAlert | None:
    """One alert per kind, tag and visit (the alerts' unique key), or None if raised before.
    `update` is null: these kinds are not counted in a case; `trajectory` is the visit
    before (impossible_travel) and this one."""
    station = stations.get(f.station) or StationInfo.unknown(f.station)
    alert_id = new_ulid(now_ms)
    current = {"station": f.station, "lat": station.lat, "lon": station.lon,
               "first_ms": f.visit_first_ms, "last_ms": f.visit_first_ms}
    trajectory = [current]
    speed = heading = None
    if f.prev is not None:
        before = stations.get(f.prev[0]) or StationInfo.unknown(f.prev[0])
        trajectory.insert(0, {"station": before.id, "lat": before.lat, "lon": before.lon,
                              "first_ms": f.prev[1], "last_ms": f.prev[2]})
        speed, heading = movement((before.lat, before.lon, f.prev[2], before.id),
                                  (station.lat, station.lon, f.visit_first_ms, f.station))
    vehicle, owner = vehicles.get(conn, f.tag)
    payload = orjson.dumps({
        "v": 1, "alert_id": alert_id, "kind": f.kind, "case_id": f.case_id, "update": None,
        "tag": format_tag(f.tag),
        "vehicle": vehicle, "owner": owner,
        "station": station.as_alert(), "seen_ms": f.visit_first_ms, "raised_ms": now_ms,
        "late": now_ms - f.visit_first_ms > late_after_ms, "trajectory": trajectory,
        "speed_kmh": speed, "heading_deg": heading, "next_stations": []})
    inserted = conn.execute(insert_ignore(conn, Alert, Alert.alert_id), {
        "alert_id": alert_id, "kind": f.kind, "case_id": f.case_id or "", "tag": to_db(f.tag),
        "station": f.station, "zone": station.zone, "visit_first_ms": f.visit_first_ms,
        "update_no": 0, "raised_ms": now_ms, "received_ms": f.received_ms,
        "payload": payload.decode()})
    if inserted.first() is None:
        return None
    _queue_deliveries(conn, alert_id, webhooks(station.zone), now_ms)
    return RaisedAlert(alert_id, station.zone, payload, f.received_ms, f.kind)
