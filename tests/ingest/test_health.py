"""Station health as a state machine, driven by an injected clock; and its store."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.health import (
    GRACE_MS,
    NEVER,
    OFFLINE,
    SILENT,
    UP,
    HealthPolicy,
    StationHealth,
    Transition,
)
from ingest.health_store import load_states, store
from registry.imports import import_stations
from registry.models import StationTransition
from registry.stations import StationInfo, load_directory

T0 = 1_763_800_000_000
S = 1000
TIMEOUT = 90 * S


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def _info(sid: str, zone: str = "z1", timeout_s: float | None = None,
          imported_ms: int = T0) -> StationInfo:
    return StationInfo(sid, sid, None, None, zone, True, imported_ms, timeout_s)


def _health(clock: Clock, *infos: StationInfo, **policy: object) -> StationHealth:
    h = StationHealth(HealthPolicy(**policy), clock)  # type: ignore[arg-type]
    h.load({i.id: i for i in infos} or {"A": _info("A")}, {})
    return h


def _changes(h: StationHealth) -> list[tuple[str, int, bool, str]]:
    return [(t.station, t.at_ms - T0, t.up, t.cause) for t in h.take_pending()[0]]


def _online(h: StationHealth, sid: str, at: int) -> None:
    h.status(sid, UP, at)


class TestStates:
    def test_a_station_that_never_reported_is_down_from_its_provisioning(self) -> None:
        clock = Clock(T0 + 3_600 * S)
        h = _health(clock, _info("A", imported_ms=T0))
        assert _changes(h) == [("A", 0, False, NEVER)]
        view = next(h.views())
        assert (view.up, view.cause, view.since_ms) == (False, NEVER, T0)

    def test_online_and_heard_is_up_at_once(self) -> None:
        clock = Clock()
        h = _health(clock)
        h.take_pending()
        _online(h, "A", T0 + 5 * S)
        assert _changes(h) == [("A", 5 * S, True, UP)]

    def test_heartbeats_without_online_status_stay_down(self) -> None:
        clock = Clock()
        h = _health(clock)
        h.take_pending()
        h.heard("A", T0 + S)
        assert _changes(h) == []
        assert h.state("A").cause == OFFLINE  # type: ignore[union-attr]

    def test_silence_is_dated_at_the_deadline_not_at_the_tick(self) -> None:
        clock = Clock()
        h = _health(clock)
        _online(h, "A", T0)
        h.heard("A", T0 + 30 * S)
        h.take_pending()
        clock.now = T0 + 30 * S + TIMEOUT + GRACE_MS - 1
        h.tick()
        assert _changes(h) == []  # within the grace: a heartbeat may be on its way
        clock.now = T0 + 400 * S
        h.tick()
        assert _changes(h) == [("A", 30 * S + TIMEOUT, False, SILENT)]

    def test_recovery_is_immediate_on_the_next_heartbeat(self) -> None:
        clock = Clock()
        h = _health(clock)
        _online(h, "A", T0)
        clock.now = T0 + 200 * S
        h.tick()
        h.take_pending()
        h.heard("A", T0 + 200 * S)
        assert _changes(h) == [("A", 200 * S, True, UP)]

    def test_heartbeats_keep_a_station_up(self) -> None:
        clock = Clock()
        h = _health(clock)
        _online(h, "A", T0)
        for beat in range(1, 40):
            h.heard("A", T0 + beat * 30 * S)
            clock.now = T0 + beat * 30 * S + 500
            h.tick()
        assert _changes(h)[1:] == [("A", 0, True, UP)]

    def test_last_will_takes_it_down_offline_and_heartbeats_do_not_undo_it(self) -> None:
        clock = Clock()
        h = _health(clock)
        _online(h, "A", T0)
        h.status("A", OFFLINE, T0 + 10 * S)
        h.heard("A", T0 + 11 * S)
        assert _changes(h)[1:] == [("A", 0, True, UP), ("A", 10 * S, False, OFFLINE)]
        _online(h, "A", T0 + 20 * S)
        assert _changes(h) == [("A", 20 * S, True, UP)]

    def test_late_events_never_move_a_station_back(self) -> None:
        clock = Clock()
        h = _health(clock)
        _online(h, "A", T0 + 100 * S)
        h.heard("A", T0 + 50 * S)  # an older heartbeat, processed late
        assert h.state("A").last_heard_ms == T0 + 100 * S  # type: ignore[union-attr]
        h.status("A", OFFLINE, T0 + 80 * S)  # an older status: ignored
        assert h.state("A").up is True  # type: ignore[union-attr]
        h.status("A", OFFLINE, T0 + 120 * S)
        _online(h, "A", T0 + 110 * S)  # older than the offline: ignored
        assert [c[1] for c in _changes(h)] == [0, 100 * S, 120 * S]
        assert h.state("A").up is False  # type: ignore[union-attr]


class TestTimeouts:
    def test_station_then_zone_then_fleet_timeout(self) -> None:
        clock = Clock()
        h = _health(clock, _info("OWN", "slow", timeout_s=600), _info("ZONE", "slow"),
                    _info("FLEET", "z1"), zone_timeout_ms={"slow": 300 * S})
        for sid in ("OWN", "ZONE", "FLEET"):
            _online(h, sid, T0)
        h.take_pending()
        clock.now = T0 + 1_000 * S
        h.tick()
        assert sorted((c[0], c[1]) for c in _changes(h)) == [
            ("FLEET", TIMEOUT), ("OWN", 600 * S), ("ZONE", 300 * S)]

    def test_policy_from_settings(self) -> None:
        from ingest.config import Settings

        s = Settings.load(None, {"BIKEWATCH_ZONE_TIMEOUTS": "slow=300, fast=45",
                                 "BIKEWATCH_HEARTBEAT_TIMEOUT_S": "120"})
        p = HealthPolicy.from_settings(s)
        assert p.timeout_ms(_info("X", "slow")) == 300 * S
        assert p.timeout_ms(_info("X", "fast", timeout_s=10)) == 10 * S
        assert p.timeout_ms(_info("X", "other")) == 120 * S


class TestReports:
    def test_down_reported_then_again_after_the_repeat_interval(self) -> None:
        clock = Clock()
        h = _health(clock, repeat_ms=600 * S)
        _online(h, "A", T0)
        h.status("A", OFFLINE, T0 + S)
        first = [e for e in h.take_events() if e.event == "down"]
        assert [(e.report, e.cause) for e in first] == [(1, OFFLINE)]
        clock.now = T0 + 300 * S
        h.tick()
        assert h.take_events() == []
        clock.now = T0 + 601 * S
        h.tick()
        again = h.take_events()
        assert [(e.event, e.report, e.since_ms) for e in again] == [("down", 2, T0 + S)]
        _online(h, "A", T0 + 700 * S)
        assert [e.event for e in h.take_events()] == ["up"]
        clock.now = T0 + 1_400 * S  # up again: no more reports, until it falls silent
        h.tick()
        assert [(e.event, e.cause, e.report) for e in h.take_events()] == [
            ("down", SILENT, 1)]

    def test_flapping_is_flagged_past_the_limit(self) -> None:
        clock = Clock()
        h = _health(clock, flap_limit=4, flap_window_ms=3_600 * S)
        h.take_events()
        for i in range(4):  # 8 changes in 8 minutes
            _online(h, "A", T0 + (2 * i) * 60 * S)
            h.status("A", OFFLINE, T0 + (2 * i + 1) * 60 * S)
        clock.now = T0 + 10 * 60 * S
        assert next(h.views()).flapping
        assert [e.event for e in h.take_events()].count("flapping") == 1
        clock.now = T0 + 3 * 3_600 * S  # an hour and more of quiet
        assert not next(h.views()).flapping


class TestStore:
    async def test_state_survives_a_restart_without_rewriting_history(
            self, engine: AsyncEngine) -> None:
        await import_stations(engine, "id,name,lat,lon,zone\nA,a,,,z1\nB,b,,,z1\n", T0)
        clock = Clock(T0 + 10 * S)
        async with engine.connect() as conn:
            directory = await load_directory(conn)
        h = StationHealth(HealthPolicy(), clock)
        h.load(directory, {})
        _online(h, "A", T0 + 10 * S)
        h.heard("A", T0 + 40 * S, read=True)
        async with engine.begin() as conn:
            await store(conn, *h.take_pending())

        clock.now = T0 + 60 * S  # restart: a new tracker from the database
        async with engine.connect() as conn:
            stored = await load_states(conn, {"A", "B"}, clock.now, 3_600 * S)
        assert set(stored) == {"A", "B"}
        again = StationHealth(HealthPolicy(), clock)
        again.load(directory, stored)
        assert again.take_pending()[0] == []  # nothing re-provisioned or re-dated
        a = again.state("A")
        assert a is not None and (a.up, a.since_ms, a.last_heard_ms, a.last_read_ms) == (
            True, T0 + 10 * S, T0 + 40 * S, T0 + 40 * S)
        assert [v.up for v in again.views()] == [True, False]
        clock.now = T0 + 300 * S
        again.tick()
        transitions, rows = again.take_pending()
        assert transitions == [Transition("A", T0 + 40 * S + TIMEOUT, False, SILENT)]
        async with engine.begin() as conn:
            await store(conn, transitions, rows)
        async with engine.connect() as conn:
            history = (await conn.execute(
                select(StationTransition.station, StationTransition.at_ms,
                       StationTransition.up).order_by(StationTransition.id))).all()
        assert [tuple(r) for r in history] == [
            ("A", T0, False), ("B", T0, False), ("A", T0 + 10 * S, True),
            ("A", T0 + 130 * S, False)]


@pytest.mark.parametrize("bad", ["slow", "slow=x", "bad zone!=5", "z=-1"])
def test_bad_zone_timeouts_name_the_setting(bad: str) -> None:
    from ingest.config import Settings
    from ingest.errors import ConfigError

    with pytest.raises(ConfigError, match="BIKEWATCH_ZONE_TIMEOUTS"):
        Settings.load(None, {"BIKEWATCH_ZONE_TIMEOUTS": bad})
