"""The HTTP API on BIKEWATCH_HTTP: `/metrics` (Prometheus text), the operators' and
police's reads and case actions, and the admin's tokens.

Every route but `/healthz` and the OpenAPI document needs a bearer token of the
roles it names (`ingest.access`); errors are `{"code", "message"}` JSON.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.stream import AlertStream
from ingest.access import (
    ERRORS,
    ApiError,
    EventStream,
    answers,
    install_errors,
    require,
)
from ingest.clock import Clock, wall_ms
from ingest.config import Settings
from ingest.errors import ConfigError, Reason
from ingest.paging import Paged, Rows
from ingest.registry_api import refusable, registry_routes, tag_of
from ingest.reports import coverage_for, render, uptime_for
from registry.imports import NAME_RE
from registry.queries import list_deliveries, list_rejects, trajectory
from registry.tokens import ROLES, Principal, create_token, list_tokens, revoke_token


def build_app(engine: AsyncEngine, metrics_text: Callable[[], bytes], settings: Settings,
              clock: Clock = wall_ms, stream: AlertStream | None = None,
              stop: asyncio.Event | None = None) -> FastAPI:
    app = FastAPI(title="bikewatch", version="1", responses=ERRORS)
    app.state.engine = engine
    install_errors(app)
    ops, police = require("ops"), require("police")
    admin = require("admin")
    stream = stream or AlertStream(engine)
    stop = stop or asyncio.Event()

    @app.get("/metrics", dependencies=[ops], response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus text format (PROTOCOL.md section 5)."""
        # On the event loop, where station health changes: the scrape sees one state.
        return Response(metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/v1/rejects", dependencies=[ops])
    async def rejects(page: Paged, reason: str | None = Query(None, max_length=40),
                      station: str | None = Query(None, max_length=64)) -> Rows:
        if reason is not None and reason not in {r.value for r in Reason}:
            raise ApiError(400, f"unknown reason {reason!r}")
        return page(await list_rejects(engine, page.limit, reason, station, page.offset))

    @app.get("/api/v1/trajectory/{tag}", dependencies=[police])
    async def get_trajectory(tag: str, since_ms: int = Query(0, ge=0, le=2**53)) -> Rows:
        return await trajectory(engine, tag_of(tag), since_ms)

    @app.get("/api/v1/alerts/stream", response_model=None,
             responses=answers(EventStream.media_type))
    async def alert_stream(
            zone: Annotated[list[str] | None,
                            Query(description="only these zones (repeat for several)")] = None,
            last_event_id: str | None = Header(None, description="resume after this alert"),
            after: str | None = Query(None, description="resume after this alert_id "
                                      "(for clients that cannot set Last-Event-ID)"),
            who: Principal = police,
    ) -> EventStream:
        zones = zone or []
        bad = [z for z in zones if not NAME_RE.fullmatch(z)]
        if bad:
            raise ApiError(400, f"bad zone {bad[0][:70]!r}")
        if who.zones is not None:  # a token limited to zones sees those only
            if outside := sorted(set(zones) - who.zones):
                raise ApiError(403, f"this token is not for zone {outside[0]!r}")
            zones = zones or sorted(who.zones)
        body = stream.events(last_event_id or after, zones, stop, clock())
        return EventStream(body, headers={"cache-control": "no-cache"})

    @app.get("/api/v1/deliveries", dependencies=[ops])
    async def deliveries(page: Paged,
                         state: str | None = Query(None, pattern="^(pending|delivered|dead)$"),
                         webhook: str | None = Query(None, max_length=64)) -> Rows:
        return page(await list_deliveries(engine, state, webhook, page.limit, page.offset))

    @app.get("/api/v1/reports/uptime", response_model=None, dependencies=[ops],
             responses=answers("text/csv", "text/plain"))
    async def report_uptime(
            from_: str | None = Query(None, alias="from", description="ISO 8601"),
            to: str | None = Query(None, description="ISO 8601"), zone: str | None = None,
            format: str = Query("json", pattern="^(json|csv|table)$"),
    ) -> dict[str, Any] | Response:
        try:
            report = await refusable(uptime_for(engine, settings, from_, to, zone, clock()))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return _rendered("uptime", report, format)

    @app.get("/api/v1/reports/registration", response_model=None,
             dependencies=[require("ops", "clerk")], responses=answers("text/csv", "text/plain"))
    async def report_registration(
            days: float = Query(30, gt=0, le=3_650, description="heard within this many days"),
            format: str = Query("json", pattern="^(json|csv|table)$"),
    ) -> dict[str, Any] | Response:
        """Per community: vehicles registered, heard in the window, unknown tags heard."""
        report = await coverage_for(engine, days, clock())
        return _rendered("registration", report, format)

    @app.get("/api/v1/tokens", dependencies=[admin])
    async def tokens() -> list[dict[str, Any]]:
        """Every token ever created, revoked ones too; never a secret."""
        return await list_tokens(engine)

    @app.post("/api/v1/tokens", status_code=201, dependencies=[admin])
    async def new_token(body: NewToken) -> dict[str, Any]:
        """A new token; its secret is in this answer and nowhere else, ever."""
        secret = await refusable(create_token(engine, body.role, body.name, clock(),
                                               body.zones))
        return {"name": body.name, "role": body.role, "zones": sorted(set(body.zones)),
                "token": secret}

    @app.delete("/api/v1/tokens/{name}", dependencies=[admin])
    async def revoke(name: str) -> dict[str, Any]:
        return {"name": name, "revoked": await refusable(revoke_token(engine, name,
                                                                       clock()))}

    app.include_router(registry_routes(engine, settings, clock))
    return app


def _rendered(kind: str, report: Any, fmt: str) -> dict[str, Any] | Response:
    out = render(kind, report, fmt)
    if isinstance(out, dict):
        return out
    return PlainTextResponse(out, media_type="text/csv" if fmt == "csv" else "text/plain")


class NewToken(BaseModel):
    role: str = Field(pattern="^(" + "|".join(ROLES) + ")$")
    name: str = Field(min_length=1, max_length=100)
    zones: list[str] = Field(default_factory=list, max_length=100,
                             description="limits a police token to these zones")


def bind(address: tuple[str, int]) -> socket.socket:
    """Bind the listening socket ourselves, so that a taken port is a clear error."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError("BIKEWATCH_HTTP", f"cannot listen on {host}:{port}: {exc.strerror}")\
            from None
    sock.listen(128)
    sock.setblocking(False)
    return sock
