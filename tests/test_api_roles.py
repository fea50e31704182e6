"""Every route of the HTTP API against every role, a revoked token and no token: the
role matrix, on the real app and a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.clock import wall_ms
from ingest.config import Settings
from ingest.http import build_app
from registry.tokens import ROLES, create_token, revoke_token

PUBLIC = frozenset({"anyone"})
# (method, path) -> the roles admitted. A new route must be added here to pass.
MATRIX: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/metrics"): frozenset({"ops"}),
    ("GET", "/api/v1/rejects"): frozenset({"ops"}),
    ("GET", "/api/v1/deliveries"): frozenset({"ops"}),
    ("GET", "/api/v1/reports/uptime"): frozenset({"ops"}),
    ("GET", "/api/v1/reports/registration"): frozenset({"ops", "clerk"}),
    ("GET", "/api/v1/trajectory/{tag}"): frozenset({"police"}),
    ("GET", "/api/v1/alerts/stream"): frozenset({"police"}),
    ("POST", "/api/v1/cases/{case_id}/ack"): frozenset({"police"}),
    ("POST", "/api/v1/alerts/{alert_id}/ack"): frozenset({"police"}),
    ("GET", "/api/v1/cases"): frozenset({"police", "clerk"}),
    ("POST", "/api/v1/cases"): frozenset({"police", "clerk"}),
    ("GET", "/api/v1/cases/{case_id}"): frozenset({"police", "clerk"}),
    ("PATCH", "/api/v1/cases/{case_id}"): frozenset({"police", "clerk"}),
    ("POST", "/api/v1/cases/{case_id}/recover"): frozenset({"police", "clerk"}),
    ("POST", "/api/v1/cases/{case_id}/cancel"): frozenset({"police", "clerk"}),
    ("GET", "/api/v1/vehicles"): frozenset({"clerk", "police", "ops"}),
    ("GET", "/api/v1/vehicles/{tag}"): frozenset({"clerk", "police", "ops"}),
    ("POST", "/api/v1/vehicles"): frozenset({"clerk"}),
    ("POST", "/api/v1/vehicles/search"): frozenset({"clerk", "police", "ops"}),
    ("PATCH", "/api/v1/vehicles/{tag}"): frozenset({"clerk"}),
    ("POST", "/api/v1/vehicles/import"): frozenset({"clerk"}),
    ("GET", "/api/v1/vehicles/export"): frozenset({"clerk"}),
    ("GET", "/api/v1/stations"): frozenset({"ops", "police"}),
    ("GET", "/api/v1/stations/{station_id}"): frozenset({"ops", "police"}),
    ("PUT", "/api/v1/stations/{station_id}"): frozenset({"ops"}),
    ("POST", "/api/v1/stations/import"): frozenset({"ops"}),
    ("GET", "/api/v1/stations/export"): frozenset({"ops"}),
    ("GET", "/api/v1/audit"): frozenset({"admin"}),
    ("GET", "/api/v1/tokens"): frozenset({"admin"}),
    ("POST", "/api/v1/tokens"): frozenset({"admin"}),
    ("DELETE", "/api/v1/tokens/{name}"): frozenset({"admin"}),
}


@pytest.fixture
async def api(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    stop = asyncio.Event()
    stop.set()  # the alert stream answers, then ends at once
    app = build_app(engine, lambda: b"", Settings.load(None, {}), stop=stop)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                 base_url="http://bikewatch") as client:
        yield client


def _routes() -> set[tuple[str, str]]:
    """Every route the app serves, from its OpenAPI document (which hides none)."""
    app = build_app(None, lambda: b"", Settings.load(None, {}))  # type: ignore[arg-type]
    return {(method.upper(), path) for path, ops in app.openapi()["paths"].items()
            for method in ops}


def test_every_route_is_in_the_matrix() -> None:
    assert _routes() == set(MATRIX)


async def test_the_role_matrix(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    now = wall_ms()
    tokens = {role: await create_token(engine, role, f"t-{role}", now) for role in ROLES}
    revoked = await create_token(engine, "admin", "t-revoked", now)
    await revoke_token(engine, "t-revoked", now)
    seen: dict[tuple[str, str, str], int] = {}
    for (method, path), admitted in sorted(MATRIX.items()):
        url = re.sub(r"\{[^}]+\}", "x1", path)
        body = {} if method in ("POST", "PATCH", "PUT") else None
        for who, secret in [*tokens.items(), ("none", None), ("revoked", revoked),
                            ("garbage", "bw_" + "x" * 43)]:
            headers = {"authorization": f"Bearer {secret}"} if secret else {}
            r = await api.request(method, url, json=body, headers=headers)
            seen[method, path, who] = r.status_code
            assert r.status_code != 500, (method, path, who, r.text)
            if admitted is PUBLIC or who in admitted:
                assert r.status_code not in (401, 403), (method, path, who, r.text)
            elif who in ROLES:
                assert (r.status_code, r.json()["code"]) == (403, "forbidden"), (method, path,
                                                                                 who)
            else:
                assert r.status_code == 401, (method, path, who)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["code"] == "unauthorized"
    assert len(seen) == len(MATRIX) * (len(ROLES) + 3)


async def test_docs_are_public(api: httpx.AsyncClient) -> None:
    doc = (await api.get("/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert set(doc["paths"]) == {p for _, p in MATRIX}
