"""The registry's HTTP API on the real app and a real database (SQLite and PostgreSQL):
vehicles, owners and who sees them, search, import and export, cases, stations, the
audit trail, pagination and errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.clock import wall_ms
from ingest.config import Settings
from ingest.http import build_app
from registry.models import Alert
from registry.tokens import create_token

LI = {"name": "Li Lei", "phone": "+86 138-0000-1234", "id_number": "330102199001011234"}
BIKE = {"tag": "00a1b2c3", "plate": "ZJ-J12345", "frame_no": "LYD2025O1", "brand": "Yadea",
        "model": "G5", "color": "white", "community": "east-1", "owner": LI}


class Api:
    """The app in-process over ASGI, with a token per role."""

    def __init__(self, client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
        self.client, self.tokens = client, tokens

    async def __call__(self, role: str, method: str, url: str, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.tokens[role]}"} | kw.pop("headers", {})
        r = await self.client.request(method, url, headers=headers, **kw)
        assert r.status_code < 500, r.text
        return r


@pytest.fixture
async def api(engine: AsyncEngine) -> AsyncIterator[Api]:
    stop = asyncio.Event()
    app = build_app(engine, lambda: b"", Settings.load(None, {}), stop=stop)
    now = wall_ms()
    tokens = {role: await create_token(engine, role, f"desk-{role}", now)
              for role in ("clerk", "police", "ops", "admin")}
    tokens["east"] = await create_token(engine, "police", "patrol-east", now, ["east"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                 base_url="http://bikewatch") as client:
        yield Api(client, tokens)


class TestVehicles:
    async def test_register_read_change_with_personal_data_by_role(self, api: Api) -> None:
        made = await api("clerk", "POST", "/api/v1/vehicles", json=BIKE)
        assert made.status_code == 201, made.text
        assert made.json()["owner"] == LI
        again = await api("clerk", "POST", "/api/v1/vehicles", json=BIKE)
        assert (again.status_code, again.json()["code"]) == (409, "conflict")
        for role in ("clerk", "police"):
            seen = (await api(role, "GET", "/api/v1/vehicles/00A1B2C3")).json()
            assert seen["owner"] == LI and seen["plate"] == "ZJ-J12345"
        ops = (await api("ops", "GET", "/api/v1/vehicles/00a1b2c3")).json()
        assert "owner" not in ops and ops["brand"] == "Yadea"
        assert "138" not in str(ops) and "Li Lei" not in str(ops)
        changed = await api("clerk", "PATCH", "/api/v1/vehicles/00a1b2c3",
                            json={"color": "red", "owner": {**LI, "phone": "13900009999"}})
        assert changed.status_code == 200, changed.text
        assert (changed.json()["color"], changed.json()["owner"]["phone"]) == (
            "red", "13900009999")
        assert changed.json()["plate"] == "ZJ-J12345"  # fields not given stay
        assert (await api("police", "PATCH", "/api/v1/vehicles/00a1b2c3",
                          json={"color": "x"})).status_code == 403

    async def test_search_by_tag_plate_frame_phone_community(self, api: Api) -> None:
        await api("clerk", "POST", "/api/v1/vehicles", json=BIKE)
        await api("clerk", "POST", "/api/v1/vehicles",
                  json={**BIKE, "tag": "00a1b2c4", "plate": "ZJ-K1", "frame_no": "X",
                        "community": "west-2", "owner": {"name": "Han", "phone": "139"}})

        async def tags(role: str, **params: str) -> list[str]:
            r = await api(role, "GET", "/api/v1/vehicles", params=params)
            if "phone" in params:  # personal data: in the body, not the URL
                r = await api(role, "POST", "/api/v1/vehicles/search", json=params)
            assert r.status_code == 200, r.text
            return [v["tag"] for v in r.json()]

        assert await tags("police", plate="zj j I2345") == ["00a1b2c3"]  # look-alikes
        assert await tags("police", frame_no="lyd 2025 01") == ["00a1b2c3"]
        assert await tags("clerk", phone="138 0000 1234") == ["00a1b2c3"]
        assert await tags("ops", community="west-2") == ["00a1b2c4"]
        assert await tags("ops", tag="00A1B2C4") == ["00a1b2c4"]
        assert await tags("ops") == ["00a1b2c3", "00a1b2c4"]
        assert (await api("ops", "POST", "/api/v1/vehicles/search",
                          json={"phone": "13800001234"})).status_code == 403
        bad = await api("police", "GET", "/api/v1/vehicles", params={"tag": "xyz"})
        assert (bad.status_code, bad.json()["code"]) == (400, "bad_request")
        short = await api("police", "POST", "/api/v1/vehicles/search", json={"phone": "13"})
        assert short.status_code == 400

    async def test_pagination_links_the_next_page(self, api: Api) -> None:
        rows = "".join(f"{i:08x},P{i},,,B,C\n" for i in range(1, 8))
        await api("clerk", "POST", "/api/v1/vehicles/import",
                  content="tag,plate,owner_name,owner_phone,brand,color\n" + rows,
                  headers={"content-type": "text/csv"})
        seen: list[str] = []
        url: str | None = "/api/v1/vehicles?limit=3"
        while url:
            r = await api("ops", "GET", url)
            seen += [v["tag"] for v in r.json()]
            link = r.headers.get("link")
            url = link[1:link.index(">")] if link else None
        assert seen == [f"{i:08x}" for i in range(1, 8)]

    async def test_import_reports_rows_and_export_round_trips(self, api: Api) -> None:
        text = ("tag,plate,owner_name,owner_phone,brand,color,community,registered_at\n"
                "00a1b2c3,ZJ-1,Li Lei,13800001234,Yadea,white,east-1,2025-03-01T09:00Z\n"
                "zz,ZJ-2,,,Niu,red,,\n00a1b2c5,ZJ-3,,,Niu,red,,\n")
        r = await api("clerk", "POST", "/api/v1/vehicles/import", content=text)
        assert r.json() == {"added": 2, "updated": 0, "unchanged": 0,
                            "errors": [{"line": 3, "reason": r.json()["errors"][0]["reason"]}]}
        header = await api("clerk", "POST", "/api/v1/vehicles/import", content="a,b\n1,2\n")
        assert (header.status_code, header.json()["code"]) == (400, "bad_request")
        exported = await api("clerk", "GET", "/api/v1/vehicles/export",
                             params={"reason": "yearly backup"})
        assert exported.headers["content-type"].startswith("text/csv")
        assert "13800001234" in exported.text
        back = await api("clerk", "POST", "/api/v1/vehicles/import", content=exported.text)
        assert back.json() == {"added": 0, "updated": 0, "unchanged": 2, "errors": []}
        audit = (await api("admin", "GET", "/api/v1/audit",
                           params={"record": "vehicles:all"})).json()
        assert [(a["action"], a["reason"]) for a in audit] == [
            ("export_personal_data", "yearly backup")]


class TestAudit:
    async def test_every_unmasked_read_is_recorded_with_who_and_why(self, api: Api) -> None:
        await api("clerk", "POST", "/api/v1/vehicles", json=BIKE)
        await api("police", "GET", "/api/v1/vehicles/00a1b2c3",
                  params={"reason": "stop on Harbour Rd"})
        await api("ops", "GET", "/api/v1/vehicles/00a1b2c3")  # no owner shown: no entry
        await api("clerk", "GET", "/api/v1/vehicles", params={"plate": "ZJJ12345"})
        log = (await api("admin", "GET", "/api/v1/audit",
                         params={"record": "vehicle:00a1b2c3"})).json()
        assert [(e["actor"], e["role"], e["reason"]) for e in log] == [
            ("desk-clerk", "clerk", ""), ("desk-police", "police", "stop on Harbour Rd"),
            ("desk-clerk", "clerk", "registered it")]
        assert all(e["action"] == "read_personal_data" for e in log)
        assert (await api("clerk", "GET", "/api/v1/audit")).status_code == 403


class TestCases:
    async def test_open_change_cancel_recover(self, api: Api, engine: AsyncEngine) -> None:
        await api("clerk", "POST", "/api/v1/vehicles", json=BIKE)
        await api("clerk", "POST", "/api/v1/vehicles", json={**BIKE, "tag": "00a1b2c4"})
        opened = await api("clerk", "POST", "/api/v1/cases", json={
            "case_id": "LH-1", "tag": "00a1b2c3", "stolen_ms": wall_ms() - 3_600_000,
            "place": "Market St", "report_no": "R-77", "police_unit": "Shangpan PS",
            "by": "clerk Wu"})
        assert opened.status_code == 201, opened.text
        case = opened.json()
        assert (case["status"], case["place"], case["report_no"]) == ("open", "Market St",
                                                                     "R-77")
        assert case["events"][0]["actor"] == "clerk Wu via desk-clerk"
        dup = await api("police", "POST", "/api/v1/cases",
                        json={"case_id": "LH-2", "tag": "00a1b2c3"})
        assert (dup.status_code, dup.json()["code"]) == (409, "conflict")
        unknown = await api("police", "POST", "/api/v1/cases",
                            json={"case_id": "LH-3", "tag": "ffff"})
        assert unknown.status_code == 404
        expires = wall_ms() + 86_400_000
        changed = await api("police", "PATCH", "/api/v1/cases/LH-1",
                            json={"notes": "seen near the river", "expires_ms": expires})
        assert (changed.json()["notes"], changed.json()["expires_ms"]) == (
            "seen near the river", expires)
        assert changed.json()["events"][-1]["action"] == "updated"
        recovered = await api("police", "POST", "/api/v1/cases/LH-1/recover",
                              json={"how": "found at the market", "by": "patrol 7"})
        assert recovered.json()["changed"] is True
        refused = await api("clerk", "POST", "/api/v1/cases/LH-1/cancel", json={})
        assert refused.status_code == 409
        await api("police", "POST", "/api/v1/cases",
                  json={"case_id": "LH-4", "tag": "00a1b2c4"})
        cancelled = await api("clerk", "POST", "/api/v1/cases/LH-4/cancel",
                              json={"note": "owner found it in the garage"})
        assert cancelled.json()["changed"] is True
        states = {c["case_id"]: (c["status"], c["recovered_how"]) for c in
                  (await api("police", "GET", "/api/v1/cases?status=all")).json()}
        assert states == {"LH-1": ("recovered", "found at the market"),
                          "LH-4": ("cancelled", "")}

    async def test_a_zone_limited_token_sees_its_zones_cases(self, api: Api,
                                                             engine: AsyncEngine) -> None:
        for n, tag in enumerate(("00a1b2c3", "00a1b2c4")):
            await api("clerk", "POST", "/api/v1/vehicles", json={**BIKE, "tag": tag})
            await api("clerk", "POST", "/api/v1/cases", json={"case_id": f"C{n}", "tag": tag})
        async with engine.begin() as conn:  # C0 was seen in the east, C1 in the west
            await conn.execute(insert(Alert), [
                {"alert_id": f"A{n}", "kind": "stolen_sighting", "case_id": f"C{n}",
                 "tag": 0x00A1B2C3 + n, "station": "S", "zone": zone, "visit_first_ms": 1,
                 "update_no": 1, "raised_ms": 1, "received_ms": 1, "payload": "{}"}
                for n, zone in enumerate(("east", "west"))])
        east = [c["case_id"] for c in (await api("east", "GET", "/api/v1/cases")).json()]
        every = [c["case_id"] for c in (await api("police", "GET", "/api/v1/cases")).json()]
        assert east == ["C0"] and sorted(every) == ["C0", "C1"]
        assert (await api("east", "GET", "/api/v1/cases/C1")).status_code == 404
        async with engine.begin() as conn:  # C0 seen in the west too
            await conn.execute(insert(Alert).values(
                alert_id="A2", kind="stolen_sighting", case_id="C0", tag=0x00A1B2C3,
                station="S", zone="west", visit_first_ms=2, update_no=2, raised_ms=2,
                received_ms=2, payload="{}"))
        c0 = (await api("east", "GET", "/api/v1/cases/C0")).json()
        assert [a["alert_id"] for a in c0["alerts"]] == ["A0"]
        every_alert = (await api("police", "GET", "/api/v1/cases/C0")).json()["alerts"]
        assert [a["alert_id"] for a in every_alert] == ["A0", "A2"]
        for url in ("/api/v1/cases/C1/ack", "/api/v1/cases/C1/recover", "/api/v1/alerts/A1/ack"):
            assert (await api("east", "POST", url, json={})).status_code == 404, url
        assert (await api("east", "POST", "/api/v1/alerts/A0/ack", json={})).status_code == 200
        assert (await api("east", "POST", "/api/v1/cases/C0/ack", json={})).status_code == 200


class TestStations:
    async def test_put_list_zones_import_export(self, api: Api) -> None:
        put = await api("ops", "PUT", "/api/v1/stations/SP-1",
                        json={"name": "Harbour Rd", "lat": 28.7, "lon": 121.5, "zone": "east",
                              "community": "east-1"})
        assert put.status_code == 200 and put.json()["community"] == "east-1"
        half = await api("ops", "PUT", "/api/v1/stations/SP-9", json={"lat": 28.7})
        assert (half.status_code, half.json()["code"]) == (400, "bad_request")
        off = await api("ops", "PUT", "/api/v1/stations/SP-9", json={"lat": 91, "lon": 1})
        assert off.status_code == 422
        report = await api("ops", "POST", "/api/v1/stations/import",
                           content="id,name,lat,lon,zone\nSP-2,Market,28.8,121.6,west\n")
        assert report.json()["added"] == 1
        ids = [s["id"] for s in (await api("ops", "GET", "/api/v1/stations")).json()]
        east = [s["id"] for s in (await api("east", "GET", "/api/v1/stations")).json()]
        assert (ids, east) == (["SP-1", "SP-2"], ["SP-1"])
        assert (await api("east", "GET", "/api/v1/stations/SP-2")).status_code == 404
        coverage = (await api("clerk", "GET", "/api/v1/reports/registration")).json()
        assert coverage["town"] == {"registered": 0, "heard": 0, "heard_ratio": None,
                                    "unknown_tags": 0}
        table = await api("ops", "GET", "/api/v1/reports/registration",
                          params={"days": 7, "format": "table"})
        assert "Registration coverage" in table.text
        assert (await api("ops", "GET", "/api/v1/reports/registration",
                          params={"days": 0})).status_code == 422
        exported = (await api("ops", "GET", "/api/v1/stations/export")).text
        again = await api("ops", "POST", "/api/v1/stations/import", content=exported)
        assert again.json() == {"added": 0, "updated": 0, "unchanged": 2, "errors": []}
