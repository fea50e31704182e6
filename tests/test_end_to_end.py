"""End to end through the session's own broker: station reads in, police alerts out."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import httpx
import numpy as np
import pytest

from ingest.broker import BrokerHandle
from ingest.clock import wall_ms
from ingest.codec import encode_binary, encode_json
from ingest.service import Worker
from registry.cases import recover_theft, report_theft
from registry.imports import import_stations, import_vehicles
from registry.queries import list_rejects, trajectory
from tests.helpers import (
    INNOCENT,
    STOLEN,
    VEHICLES,
    Police,
    bearer,
    metric,
    publisher,
    running_worker,
    settings_for,
    stage_registry,
    town,
    until,
)

pytestmark = pytest.mark.broker

def _metric(worker: Worker, name: str, **labels: str) -> float:
    return metric(worker, name, **labels) or 0.0


class TestStolenSighting:
    async def test_alert_per_visit_with_trajectory(self, broker: BrokerHandle,
                                                   sqlite_url: str) -> None:
        async with town(broker, sqlite_url, "+") as (settings, worker, police, pub):
            await until(lambda: len(worker.holder.current) == 1, 5)
            t0 = wall_ms() - 200_000
            tags = np.array([INNOCENT, STOLEN, STOLEN], np.uint64)
            pub.reads("SP-0040", tags, np.array([t0, t0, t0 + 5000]), np.array([-50, -60, -55]),
                      t0)
            # the same visit, a later batch: no second alert
            pub.reads("SP-0040", tags[1:2], np.array([t0 + 20_000]), np.array([-58]), t0)
            # another station, 2 minutes later: update 2
            pub.reads("SP-0042", tags[1:2], np.array([t0 + 140_000]), np.array([-40]), t0)
            alerts = await police.wait_for(2)
            await asyncio.sleep(0.3)
            assert len(police.alerts) == 2
            first, second = alerts
            assert police.topics == [f"{settings.mqtt_root}/alerts/shangpan"] * 2
            assert (first["kind"], first["case_id"], first["update"], first["tag"]) == (
                "stolen_sighting", "LH-2026-0042", 1, "00a1b2c3")
            assert first["vehicle"] == {"plate": "ZJ-J12345", "brand": "Yadea",
                                        "color": "white"}
            assert first["station"] == {"id": "SP-0040", "name": "Harbour Rd / 2nd St",
                                        "lat": 28.72, "lon": 121.54, "zone": "shangpan"}
            assert first["seen_ms"] == t0 and first["late"] is False
            assert first["speed_kmh"] is None and first["heading_deg"] is None
            # no history yet: the nearest stations, then the nearest ahead of the bike
            assert first["next_stations"] == ["SP-0042", "SP-0050"]
            assert second["next_stations"] == ["SP-0050"]
            assert second["update"] == 2
            traj = second["trajectory"]
            assert [v["station"] for v in traj] == ["SP-0040", "SP-0042"]  # type: ignore[index, union-attr]
            assert traj[0]["first_ms"] == t0 and traj[0]["last_ms"] == t0 + 20_000  # type: ignore[index]
            # 1.479 km from the end of the last visit to this one, 120 s: 44.4 km/h, NE
            assert second["speed_kmh"] == pytest.approx(44.4, abs=0.1)
            assert 30 < second["heading_deg"] < 60  # type: ignore[operator]
            assert first["alert_id"] != second["alert_id"] and len(first["alert_id"]) == 26  # type: ignore[arg-type]
            assert _metric(worker, "bikewatch_alerts_total", kind="stolen_sighting") == 2
            assert _metric(worker, "bikewatch_reads_total") == 5
            assert _metric(worker, "bikewatch_alert_latency_seconds_count") == 2
            # the database's share of it: at most the whole, for the same two alerts
            assert _metric(worker, "bikewatch_alert_commit_seconds_count") == 2
            assert _metric(worker, "bikewatch_alert_commit_seconds_sum") <= _metric(
                worker, "bikewatch_alert_latency_seconds_sum")
            visits = await trajectory(worker.engine, STOLEN)
            assert [(v["station"], v["reads"]) for v in visits] == [
                ("SP-0040", 3), ("SP-0042", 1)]

    async def test_recovered_case_raises_nothing_and_reports_reach_the_worker_fast(
            self, broker: BrokerHandle, sqlite_url: str) -> None:
        async with town(broker, sqlite_url, None) as (settings, worker, police, pub):
            await recover_theft(worker.engine, "LH-2026-0042", wall_ms())
            assert await until(lambda: len(worker.holder.current) == 0, 1.0)
            t0 = wall_ms()
            pub.reads("SP-0040", np.array([STOLEN], np.uint64), np.array([t0]),
                      np.array([-50]), t0)
            assert await until(lambda: _metric(worker, "bikewatch_reads_total") == 1)
            started = time.monotonic()
            await report_theft(worker.engine, INNOCENT, "LH-2", t0 - 1000, wall_ms())
            assert await until(lambda: len(worker.holder.current) == 1, 1.0)
            assert time.monotonic() - started < 1.0
            pub.reads("SP-0050", np.array([INNOCENT], np.uint64), np.array([t0 + 1]),
                      np.array([-50]), t0)
            alerts = await police.wait_for(1)
            await asyncio.sleep(0.3)
            assert [a["case_id"] for a in police.alerts] == ["LH-2"]
            assert police.topics == [f"{settings.mqtt_root}/alerts/xiaozhi"]
            assert alerts[0]["update"] == 1

    async def test_unknown_station_alerts_go_to_unassigned(self, broker: BrokerHandle,
                                                           sqlite_url: str) -> None:
        async with town(broker, sqlite_url, "unassigned") as (_, worker, police, pub):
            t0 = wall_ms()
            pub.reads("XX-9", np.array([STOLEN], np.uint64), np.array([t0]), np.array([0]),
                      t0)
            alerts = await police.wait_for(1)
            assert alerts and alerts[0]["station"] == {
                "id": "XX-9", "name": "", "lat": None, "lon": None, "zone": "unassigned"}
            assert _metric(worker, "bikewatch_unknown_station_batches_total") == 1
            assert _metric(worker, "bikewatch_station_up", station="XX-9",
                           zone="unassigned") == 0
            assert metric(worker, "bikewatch_station_up", station="XX-9",
                          zone="unassigned") is None


class TestIntake:
    async def test_duplicates_rejects_and_metrics(self, broker: BrokerHandle,
                                                  db_url: str) -> None:
        async with town(broker, db_url, None) as (settings, worker, _, pub):
            root = settings.mqtt_root
            t0 = wall_ms()
            good = encode_binary(7, 1, t0, [1, 2, 3], [0, 1, 2], [-50, 0, -60])
            for _ in range(3):  # a station resending after a reconnect
                pub.raw(f"{root}/stations/SP-0040/reads", good)
            pub.raw(f"{root}/stations/SP-0040/reads", b"[not an object]")
            pub.raw(f"{root}/stations/SP-0040/reads", b'{"v": 1, "boot"')
            pub.raw(f"{root}/stations/SP-0042/reads", encode_json(1, 1, t0, [5], [t0],
                                                                station="SP-0040"))
            pub.raw(f"{root}/stations/SP-0042/reads", b'{"v":1,"boot":1,"seq":2,"sent_ms":1,'
                    b'"reads":[{"tag":"zz","ts_ms":1},{"tag":"01","ts_ms":1}]}')
            # same seq, another boot: a different batch
            pub.raw(f"{root}/stations/SP-0040/reads", encode_binary(8, 1, t0, [1], [0]))
            pub.status("SP-0040", "online")
            pub.heartbeat("SP-0040", t0)
            assert await until(lambda: _metric(worker, "bikewatch_reads_total") == 5)
            assert await until(lambda: _metric(
                worker, "bikewatch_stations_online_ratio") == pytest.approx(1 / 3))
            assert _metric(worker, "bikewatch_duplicate_batches_total") == 2
            assert _metric(worker, "bikewatch_rejected_total", reason="bad_format") == 1
            assert _metric(worker, "bikewatch_rejected_total", reason="bad_json") == 1
            assert _metric(worker, "bikewatch_rejected_total",
                           reason="station_mismatch") == 1
            assert _metric(worker, "bikewatch_rejected_reads_total", reason="bad_tag") == 1
            # every payload accounted for: accepted, a duplicate or rejected
            rejected = sum(_metric(worker, "bikewatch_rejected_total", reason=r) or 0
                           for r in ("bad_format", "bad_json", "station_mismatch"))
            assert _metric(worker, "bikewatch_received_batches_total") == 8 == (
                _metric(worker, "bikewatch_batches_total")
                + _metric(worker, "bikewatch_duplicate_batches_total") + rejected)
            assert _metric(worker, "bikewatch_station_up", station="SP-0040",
                           zone="shangpan") == 1
            assert _metric(worker, "bikewatch_station_up", station="SP-0042",
                           zone="shangpan") == 0
            rejects = await list_rejects(worker.engine)
            assert {r["reason"] for r in rejects} == {"bad_format", "bad_json",
                                                      "station_mismatch", "bad_tag"}
            ops_token = await bearer(settings.db_url, "ops")
            async with httpx.AsyncClient(base_url=f"http://{settings.http}",
                                         headers=ops_token) as http:
                text = (await http.get("/metrics")).text
                assert 'bikewatch_rejected_total{reason="bad_json"} 1.0' in text
                assert (await http.get("/metrics", headers={"authorization": ""})
                        ).status_code == 401
                api = (await http.get("/api/v1/rejects", params={"reason": "bad_tag"})).json()
                assert [r["reads"] for r in api] == [1]
                bad = await http.get("/api/v1/trajectory/0x1",
                                     headers=await bearer(settings.db_url, "police"))
                assert (bad.status_code, bad.json()["code"]) == (400, "bad_request")


    async def test_a_gap_in_seq_is_counted_until_the_batch_comes(
            self, broker: BrokerHandle, db_url: str) -> None:
        async with town(broker, db_url, None) as (settings, worker, _, pub):
            t0 = wall_ms()
            topic = f"{settings.mqtt_root}/stations/SP-0040/reads"
            for seq in (1, 2, 4, 5):  # seq 3 lost on the way, for now
                pub.raw(topic, encode_binary(7, seq, t0, [seq], [0]))
            pub.raw(topic, encode_binary(8, 1, t0, [9], [0]))  # a reboot: a new range
            assert await until(lambda: _metric(worker, "bikewatch_batches_total") == 5)
            await worker._gaps()
            assert _metric(worker, "bikewatch_missing_batches", zone="shangpan") == 1
            pub.raw(topic, encode_binary(7, 3, t0, [3], [0]))  # sent late after all
            assert await until(lambda: _metric(worker, "bikewatch_batches_total") == 6)
            await worker._gaps()
            assert _metric(worker, "bikewatch_missing_batches", zone="shangpan") == 0


    async def test_a_locked_database_holds_intake_then_everything_is_stored(
            self, broker: BrokerHandle, sqlite_url: str) -> None:
        async with town(broker, sqlite_url, None) as (settings, worker, _, pub):
            topic = f"{settings.mqtt_root}/stations/SP-0040/reads"
            lock = sqlite3.connect(sqlite_url.split("///", 1)[1], isolation_level=None,
                                   timeout=30)
            lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            try:
                t0 = wall_ms()
                for seq in range(1, 4):
                    pub.raw(topic, encode_binary(7, seq, t0, [seq], [0]))
                await asyncio.sleep(2.5)
                assert (_metric(worker, "bikewatch_intake_lag_seconds") or 0) >= 2
                assert _metric(worker, "bikewatch_batches_total") == 0  # none committed
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            assert await until(lambda: _metric(worker, "bikewatch_batches_total") == 3, 15)
            assert await until(lambda: _metric(worker, "bikewatch_intake_lag_seconds") == 0)


class TestStationUptime:
    async def test_up_silent_back_offline_stored_reported_and_served(
            self, broker: BrokerHandle, db_url: str) -> None:
        async with town(broker, db_url, None, "health", BIKEWATCH_HEARTBEAT_TIMEOUT_S="1.5",
                         BIKEWATCH_DOWN_REPEAT_S="2") as (settings, worker, ops, pub):
            def up() -> float:
                return _metric(worker, "bikewatch_station_up", station="SP-0040",
                               zone="shangpan")

            pub.status("SP-0040", "online")
            assert await until(lambda: up() == 1)
            assert _metric(worker, "bikewatch_stations_online_ratio") == pytest.approx(1 / 3)
            assert _metric(worker, "bikewatch_stations_down", cause="never") == 2
            # silent: down at its deadline, found within the grace, told to operators
            assert await until(lambda: up() == 0, 8)
            st = worker.health.state("SP-0040")
            assert st is not None and st.cause == "silent"
            assert st.since_ms == st.last_heard_ms + 1500  # type: ignore[operator]
            def told() -> list[tuple[object, ...]]:
                return [(e["event"], e["cause"], e["report"]) for e in ops.alerts
                        if e["station"] == "SP-0040"]

            assert await until(lambda: len(told()) >= 2)
            assert told()[:2] == [("up", "online", 0), ("down", "silent", 1)]
            assert f"{settings.mqtt_root}/health/shangpan" in ops.topics
            assert await until(lambda: len(told()) >= 3, 6)  # still down: reported again
            assert told()[2] == ("down", "silent", 2)
            pub.heartbeat("SP-0040", wall_ms())
            assert await until(lambda: up() == 1)  # at once, not at the next tick
            pub.status("SP-0040", "offline")
            assert await until(lambda: up() == 0)
            assert _metric(worker, "bikewatch_station_down_seconds", station="SP-0040",
                           zone="shangpan", cause="offline") >= 0
            # stored: SP-0040 and SP-0042 provisioned, SP-0040 silent, then offline
            assert await until(lambda: _metric(worker, "bikewatch_station_transitions_total",
                                               zone="shangpan", to="down") == 4)
            async with httpx.AsyncClient(base_url=f"http://{settings.http}",
                                         headers=await bearer(settings.db_url, "ops")) as http:
                report = (await http.get("/api/v1/reports/uptime")).json()
                csv_text = (await http.get("/api/v1/reports/uptime",
                                           params={"format": "csv"})).text
                bad = await http.get("/api/v1/reports/uptime", params={"from": "tomorrow"})
                nozone = await http.get("/api/v1/reports/uptime", params={"zone": "nowhere"})
        assert report["fleet"]["stations"] == 3
        assert report["target"] == {"stage": 1, "ratio": 0.95,
                                    "from_ms": report["target"]["from_ms"]}
        sp40 = next(s for s in report["below_target"] if s["station"] == "SP-0040")
        # provisioned (down), up, silent, up, offline: three outages, five changes
        assert (sp40["outages"], sp40["transitions"]) == (3, 5)
        assert csv_text.splitlines()[0].startswith("scope,id,zone,stations,availability")
        assert (bad.status_code, nozone.status_code) == (400, 404)

    async def test_a_restart_keeps_state_and_history(self, broker: BrokerHandle,
                                                     sqlite_url: str) -> None:
        from sqlalchemy import func, select

        from registry.models import StationTransition

        async def stored(worker: Worker) -> int:
            async with worker.engine.connect() as conn:
                return int((await conn.execute(
                    select(func.count()).select_from(StationTransition))).scalar_one())

        settings = settings_for(broker, sqlite_url)
        await stage_registry(sqlite_url)
        pub = publisher(settings)
        try:
            async with running_worker(settings) as worker:
                pub.status("SP-0040", "online")
                assert await until(lambda: worker.health.online_ratio() > 0)

                async def stored_all() -> bool:
                    # Taken from `pending` before they are committed: count the rows.
                    return await stored(worker) == 4  # three provisioned, SP-0040 up

                assert await until(stored_all)
                since = worker.health.state("SP-0040").since_ms  # type: ignore[union-attr]
            before = 4
            async with running_worker(settings) as again:  # same database, same session
                st = again.health.state("SP-0040")
                assert st is not None and (st.up, st.since_ms) == (True, since)
                pub.heartbeat("SP-0040", wall_ms())
                await asyncio.sleep(1.5)  # a health pass: nothing to add
                assert await stored(again) == before
                assert _metric(again, "bikewatch_station_up", station="SP-0040",
                               zone="shangpan") == 1
        finally:
            pub.close()


class TestLateReport:
    async def test_a_theft_reported_late_alerts_at_once_with_the_path_so_far(
            self, broker: BrokerHandle, db_url: str) -> None:
        from registry.db import open_database

        settings = settings_for(broker, db_url)
        await stage_registry(db_url)
        engine = await open_database(db_url)
        await recover_theft(engine, "LH-2026-0042", wall_ms())  # start with nothing stolen
        police = Police(settings, f"{settings.mqtt_root}/alerts/+")
        pub = publisher(settings)
        try:
            async with running_worker(settings) as worker:
                t0 = wall_ms() - 20 * 60_000  # the ride, twenty minutes ago
                for station, t in (("SP-0040", t0), ("SP-0042", t0 + 120_000)):
                    pub.reads(station, np.array([INNOCENT], np.uint64), np.array([t]),
                              np.array([-55]), t)
                assert await until(lambda: metric(worker, "bikewatch_reads_total") == 2)
                # reported after the ride, stolen before it: the alert comes at once
                await report_theft(engine, INNOCENT, "LH-LATE-1", t0 - 600_000, wall_ms())
                alerts = await police.wait_for(1, 5)
                # stolen after the ride: nothing to say yet
                await report_theft(engine, STOLEN, "LH-LATE-2", wall_ms() - 1000, wall_ms())
                await asyncio.sleep(1.5)
            async with running_worker(settings):  # looking again raises nothing twice
                await asyncio.sleep(1.5)
        finally:
            pub.close()
            police.close()
            await engine.dispose()
        assert len(police.alerts) == 1
        a = alerts[0]
        assert (a["case_id"], a["station"]["id"], a["update"], a["late"]) == (
            "LH-LATE-1", "SP-0042", 1, True)
        assert [v["station"] for v in a["trajectory"]] == ["SP-0040", "SP-0042"]
        assert a["seen_ms"] == t0 + 120_000 and a["speed_kmh"] is not None


class TestOtherKinds:
    async def test_tamper_and_impossible_travel(self, broker: BrokerHandle,
                                               db_url: str) -> None:
        async with town(broker, db_url, "+") as (settings, worker, police, pub):
            root = settings.mqtt_root
            t = wall_ms() - 600_000
            # tamper: the registered bike, twice in one visit; an unregistered tag
            for seq, dt in ((1, 0), (2, 5_000)):
                pub.raw(f"{root}/stations/SP-0040/reads", encode_binary(
                    3, seq, t + dt, [INNOCENT, 0x77], [0, 0], [-50, -50], [0, 0], [2, 2]))
            # an ordinary ride from there: 1.5 km in five minutes
            pub.raw(f"{root}/stations/SP-0042/reads",
                    encode_json(3, 1, t, [INNOCENT], [t + 300_000], [-52]))
            # then 1.5 km further in ten seconds: a second tag with the same id
            pub.raw(f"{root}/stations/SP-0050/reads",
                    encode_json(3, 1, t, [INNOCENT], [t + 310_000], [-52]))
            alerts = await police.wait_for(2, 8)
            await asyncio.sleep(0.5)
            assert _metric(worker, "bikewatch_alerts_total", kind="tamper") == 1
            assert _metric(worker, "bikewatch_alerts_total", kind="impossible_travel") == 1
            assert _metric(worker, "bikewatch_alerts_total", kind="stolen_sighting") == 0
        by_kind = {a["kind"]: a for a in alerts}
        assert len(police.alerts) == 2
        tamper = by_kind["tamper"]
        assert (tamper["tag"], tamper["station"]["id"], tamper["case_id"], tamper["update"],
                tamper["vehicle"]["plate"]) == ("00a1b2c4", "SP-0040", None, None, "ZJ-J12346")
        clone = by_kind["impossible_travel"]
        assert [v["station"] for v in clone["trajectory"]] == ["SP-0042", "SP-0050"]
        assert clone["speed_kmh"] > 120 and clone["station"]["zone"] == "xiaozhi"


class TestRide:
    async def test_a_theft_across_five_stations_gives_five_growing_alerts_in_order(
            self, broker: BrokerHandle, sqlite_url: str) -> None:
        from registry.db import open_database

        settings = settings_for(broker, sqlite_url)
        engine = await open_database(sqlite_url)
        road = "".join(f"R-{i},Road {i},28.70,{121.500 + 0.005 * i:.3f},river\n" for i in range(5))
        await import_stations(engine, "id,name,lat,lon,zone\n" + road, wall_ms())
        await import_vehicles(engine, VEHICLES)
        t0 = wall_ms() - 30 * 60_000
        await report_theft(engine, STOLEN, "LH-RIDE", t0 - 60_000, wall_ms())
        await engine.dispose()
        police = Police(settings, f"{settings.mqtt_root}/alerts/river")
        pub = publisher(settings)
        try:
            async with running_worker(settings):
                for i in range(5):  # 488 m a station, two minutes apart
                    t = t0 + i * 120_000
                    pub.reads(f"R-{i}", np.array([STOLEN] * 3, np.uint64),
                              np.array([t, t + 5_000, t + 10_000]), np.array([-60, -50, -55]), t)
                    await police.wait_for(i + 1, 5)
                await asyncio.sleep(0.5)
        finally:
            pub.close()
            police.close()
        alerts = police.alerts
        assert [a["update"] for a in alerts] == [1, 2, 3, 4, 5]
        assert [a["station"]["id"] for a in alerts] == [f"R-{i}" for i in range(5)]
        for n, a in enumerate(alerts, 1):
            assert [v["station"] for v in a["trajectory"]] == [f"R-{i}" for i in range(n)]
        # 488 m from one visit's last read to the next one's first, 110 s: 16.0 km/h, east
        assert all(a["speed_kmh"] == pytest.approx(16.0, abs=0.1) and 85 < a["heading_deg"] < 95
                   for a in alerts[1:])
        assert alerts[2]["next_stations"][0] == "R-3"  # ahead, eastward


class TestCaseLifecycle:
    async def test_acknowledge_keep_updating_recover_and_who_did_it(
            self, broker: BrokerHandle, db_url: str) -> None:
        async with town(broker, db_url, "+") as (settings, worker, police, pub):
            await until(lambda: len(worker.holder.current) == 1, 5)
            t0 = wall_ms() - 300_000
            pub.reads("SP-0040", np.array([STOLEN], np.uint64), np.array([t0]),
                      np.array([-50]), t0)
            first = (await police.wait_for(1))[0]
            async with httpx.AsyncClient(base_url=f"http://{settings.http}",
                                         headers=await bearer(settings.db_url, "police",
                                                              name="dispatch")) as http:
                listed = (await http.get("/api/v1/cases")).json()
                assert [(c["case_id"], c["latest_alert"]["alert_id"]) for c in listed] == [
                    ("LH-2026-0042", first["alert_id"])]
                ack = await http.post("/api/v1/cases/LH-2026-0042/ack",
                                      json={"by": "patrol 7", "note": "on our way"})
                assert ack.status_code == 200
                # an acknowledged case keeps producing updates
                pub.reads("SP-0042", np.array([STOLEN], np.uint64), np.array([t0 + 120_000]),
                          np.array([-50]), t0)
                second = (await police.wait_for(2))[1]
                assert second["update"] == 2
                assert (await http.post(f"/api/v1/alerts/{second['alert_id']}/ack",
                                        json={"by": "patrol 7"})).status_code == 200
                done = await http.post("/api/v1/cases/LH-2026-0042/recover",
                                       json={"by": "officer Li", "note": "found at market"})
                assert done.json()["changed"] is True
                assert await until(lambda: len(worker.holder.current) == 0, 3)
                pub.reads("SP-0050", np.array([STOLEN], np.uint64), np.array([t0 + 240_000]),
                          np.array([-50]), t0)
                await asyncio.sleep(1)
                detail = (await http.get("/api/v1/cases/LH-2026-0042")).json()
                refusals = [
                    (await http.post("/api/v1/cases/LH-404/ack", json={"by": "x"})).status_code,
                    (await http.post("/api/v1/cases/LH-2026-0042/ack",
                                     json={"by": "x"})).status_code,
                    (await http.post("/api/v1/cases/LH-2026-0042/ack",
                                     json={"by": 7})).status_code,
                    (await http.get("/api/v1/cases/LH-404")).status_code]
        assert len(police.alerts) == 2  # recovered: quiet
        assert (detail["status"], detail["acked_by"], detail["updates"]) == (
            "recovered", "patrol 7 via dispatch", 2)
        assert [v["station"] for v in detail["trajectory"]][:2] == ["SP-0040", "SP-0042"]
        assert [(a["update"], a["acked_by"]) for a in detail["alerts"]] == [
            (1, None), (2, "patrol 7 via dispatch")]
        assert [(e["action"], e["actor"], e["alert_id"]) for e in detail["events"]] == [
            ("opened", "cli", None), ("acknowledged", "patrol 7 via dispatch", None),
            ("acknowledged", "patrol 7 via dispatch", second["alert_id"]),
            ("recovered", "officer Li via dispatch", None)]
        assert detail["events"][3]["note"] == "found at market"
        assert refusals == [404, 409, 422, 404]
