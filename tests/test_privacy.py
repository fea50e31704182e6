"""Personal data stays out of logs and metrics: a full run (registry import, a theft,
an alert over MQTT and to a webhook cleared for full contact that is down, API reads,
searches and refusals) with every logger at DEBUG, scanned for any phone number or
resident ID number whole. Run on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import re

import httpx
import numpy as np
import pytest

from ingest.broker import BrokerHandle, free_port
from ingest.cli import setup_logging
from ingest.clock import wall_ms
from registry.db import open_database
from registry.imports import import_vehicles
from tests.helpers import (
    STOLEN,
    Police,
    bearer,
    metric,
    publisher,
    running_worker,
    settings_for,
    stage_registry,
    until,
)

ID_NUMBER = "330102199001011234"
OWNERS = ("tag,plate,owner_name,owner_phone,brand,color,owner_id_number\n"
          f"00a1b2c3,ZJ-J12345,Li Lei,13800001234,Yadea,white,{ID_NUMBER}\n"
          "00a1b2c4,ZJ-J12346,Han Meimei,+86 139-0000-1234,Niu,black,\n")
SECRETS = ("13800001234", "13900001234", ID_NUMBER)


def _leaks(text: str) -> list[str]:
    digits = re.sub(r"[\s\-+]", "", text)  # also "139-0000-1234" and "+86 139 ..."
    return [s for s in SECRETS if s in text or s in digits]


@pytest.mark.broker
async def test_no_phone_or_id_number_in_logs_or_metrics(
        broker: BrokerHandle, db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    setup_logging(True)
    caplog.set_level(logging.DEBUG)
    hook = [{"name": "dispatch", "url": f"http://127.0.0.1:{free_port()}/down",
             "secrets": ["whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"], "contact": "full"}]
    settings = settings_for(broker, db_url, BIKEWATCH_WEBHOOKS=json.dumps(hook),
                            BIKEWATCH_WEBHOOK_TIMEOUT_S="0.5")
    await stage_registry(db_url)
    engine = await open_database(db_url)
    await import_vehicles(engine, OWNERS)
    await engine.dispose()
    police = Police(settings, f"{settings.mqtt_root}/alerts/+")
    pub = publisher(settings)
    tokens = {r: await bearer(db_url, r) for r in ("clerk", "police", "ops")}
    try:
        async with running_worker(settings) as worker:
            await until(lambda: len(worker.holder.current) == 1, 5)
            t = wall_ms()
            pub.reads("SP-0040", np.array([STOLEN], np.uint64), np.array([t]),
                      np.array([-50]), t)
            alert = (await police.wait_for(1))[0]
            async with httpx.AsyncClient(base_url=f"http://{settings.http}") as http:
                async def call(role: str, method: str, url: str, **kw: object) -> None:
                    r = await http.request(method, url, headers=tokens[role],
                                           **kw)  # type: ignore[arg-type]
                    assert r.status_code < 500, r.text

                await call("police", "GET", "/api/v1/vehicles/00a1b2c3")
                await call("clerk", "POST", "/api/v1/vehicles/search",
                           json={"phone": "13900001234"})
                await call("ops", "POST", "/api/v1/vehicles/search",
                           json={"phone": "13900001234"})  # refused
                await call("clerk", "POST", "/api/v1/vehicles/import",
                           content=OWNERS + "zz,P,Wu,13700001234,B,C,\n")
                await call("clerk", "POST", "/api/v1/vehicles", json={
                    "tag": "00a1b2c3", "owner": {"phone": "13800001234"}})  # exists
                await call("clerk", "POST", "/api/v1/vehicles", json={
                    "tag": "00a1b2c9", "owner": {"phone": "13800001234" * 4}})  # too long
                await call("clerk", "GET", "/api/v1/vehicles/export")
                await call("police", "GET", f"/api/v1/cases/{alert['case_id']}")
            assert await until(lambda: (metric(  # the webhook was tried, with the owner whole
                worker, "bikewatch_alert_deliveries_total", kind="stolen_sighting",
                channel="webhook/dispatch", outcome="failed") or 0) >= 1, 5)
            metrics = worker.metrics_text().decode()
    finally:
        pub.close()
        police.close()
    assert alert["owner"] == {"name": "L*****", "phone": "138****1234"}
    assert "registry version" in caplog.text  # the capture saw the worker's own lines
    assert _leaks(caplog.text) == []
    assert _leaks(metrics) == []
