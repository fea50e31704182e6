"""The HTTP API on BIKEWATCH_HTTP: `/metrics` (Prometheus text) and the operator reads.

The registry's full API, with tokens and roles, is the registry issue's; here
are the endpoints the core pipeline owes its operators.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Header, HTTPException, Query, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.stream import AlertStream
from ingest.clock import Clock, wall_ms
from ingest.config import Settings
from ingest.errors import ConfigError, Reason
from ingest.reports import as_csv, as_json, as_table, uptime_for
from registry.cases import acknowledge_alert, acknowledge_case, recover_theft
from registry.errors import Refused
from registry.imports import NAME_RE
from registry.queries import case_detail, list_cases, list_deliveries, list_rejects, trajectory
from registry.tags import BadTag, parse_tag


def build_app(engine: AsyncEngine, metrics_text: Callable[[], bytes], settings: Settings,
              clock: Clock = wall_ms, stream: AlertStream | None = None,
              stop: asyncio.Event | None = None) -> FastAPI:
    app = FastAPI(title="bikewatch", version="1")
    stream = stream or AlertStream(engine)
    stop = stop or asyncio.Event()

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        # On the event loop, where station health changes: the scrape sees one state.
        return Response(metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/v1/rejects")
    async def rejects(limit: int = Query(50, ge=1, le=10_000), reason: str | None = None,
                      station: str | None = None) -> list[dict[str, Any]]:
        if reason is not None and reason not in {r.value for r in Reason}:
            raise HTTPException(400, f"unknown reason {reason!r}")
        return await list_rejects(engine, limit, reason, station)

    @app.get("/api/v1/trajectory/{tag}")
    async def get_trajectory(tag: str, since_ms: int = Query(0, ge=0),
                             ) -> list[dict[str, Any]]:
        try:
            value = parse_tag(tag)
        except BadTag as exc:
            raise HTTPException(400, str(exc)) from None
        return await trajectory(engine, value, since_ms)

    @app.get("/api/v1/alerts/stream", response_model=None)
    async def alert_stream(
            zone: Annotated[list[str] | None,
                            Query(description="only these zones (repeat for several)")] = None,
            last_event_id: str | None = Header(None, description="resume after this alert"),
            after: str | None = Query(None, description="resume after this alert_id "
                                      "(for clients that cannot set Last-Event-ID)"),
    ) -> StreamingResponse:
        zones = zone or []
        bad = [z for z in zones if not NAME_RE.fullmatch(z)]
        if bad:
            raise HTTPException(400, f"bad zone {bad[0][:70]!r}")
        body = stream.events(last_event_id or after, zones, stop, clock())
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    @app.get("/api/v1/cases")
    async def cases(status: str = Query("open", pattern="^(open|recovered|all)$"),
                    limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
        """Cases with their latest alert, newest report first."""
        return await list_cases(engine, status, limit)

    @app.get("/api/v1/cases/{case_id}")
    async def case(case_id: str) -> dict[str, Any]:
        """One case: its full trajectory since the theft, its alerts, who changed what."""
        found = await case_detail(engine, case_id)
        if found is None:
            raise HTTPException(404, f"unknown case {case_id[:70]!r}")
        return found

    @app.post("/api/v1/cases/{case_id}/ack")
    async def ack_case(case_id: str, body: Actor) -> dict[str, Any]:
        """A patrol takes the case on; it keeps raising alerts."""
        result = await _refusable(acknowledge_case(engine, case_id, body.by, clock(),
                                                   body.note))
        return {"case_id": case_id, "message": result.message}

    @app.post("/api/v1/cases/{case_id}/recover")
    async def recover(case_id: str, body: Actor) -> dict[str, Any]:
        """The bike is back: no more alerts for this case."""
        result = await _refusable(recover_theft(engine, case_id, clock(), body.by, body.note))
        return {"case_id": case_id, "changed": result.changed, "message": result.message}

    @app.post("/api/v1/alerts/{alert_id}/ack")
    async def ack_alert(alert_id: str, body: Actor) -> dict[str, Any]:
        case_id = await _refusable(acknowledge_alert(engine, alert_id, body.by, clock(),
                                                     body.note))
        return {"alert_id": alert_id, "case_id": case_id}

    @app.get("/api/v1/deliveries")
    async def deliveries(state: str | None = Query(None, pattern="^(pending|delivered|dead)$"),
                         webhook: str | None = None,
                         limit: int = Query(50, ge=1, le=10_000)) -> list[dict[str, Any]]:
        return await list_deliveries(engine, state, webhook, limit)

    @app.get("/api/v1/reports/uptime", response_model=None)
    async def report_uptime(
            from_: str | None = Query(None, alias="from", description="ISO 8601"),
            to: str | None = Query(None, description="ISO 8601"), zone: str | None = None,
            format: str = Query("json", pattern="^(json|csv|table)$"),
    ) -> dict[str, Any] | Response:
        try:
            report = await uptime_for(engine, settings, from_, to, zone, clock())
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        except Refused as exc:
            raise HTTPException(404, str(exc)) from None
        if format == "csv":
            return PlainTextResponse(as_csv(report), media_type="text/csv")
        if format == "table":
            return PlainTextResponse(as_table(report))
        return as_json(report)

    return app


_T = TypeVar("_T")


class Actor(BaseModel):
    """Who makes a change (recorded with it), and why. Declared by the caller until API
    tokens exist."""

    by: str = Field(min_length=1, max_length=100)
    note: str = Field("", max_length=500)


async def _refusable(change: Awaitable[_T]) -> _T:
    """A refused change (unknown case, closed case) is a 404 or 409, not a 500."""
    try:
        return await change
    except Refused as exc:
        raise HTTPException(404 if str(exc).startswith("unknown") else 409, str(exc)) from None


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
