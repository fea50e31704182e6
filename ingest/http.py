"""The HTTP API on BIKEWATCH_HTTP: `/metrics` (Prometheus text) and the operator reads.

The registry's full API, with tokens and roles, is the registry issue's; here
are the endpoints the core pipeline owes its operators.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Query, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.ext.asyncio import AsyncEngine

from alerts.stream import AlertStream
from ingest.clock import Clock, wall_ms
from ingest.config import Settings
from ingest.errors import ConfigError, Reason
from ingest.reports import as_csv, as_json, as_table, uptime_for
from registry.errors import Refused
from registry.imports import NAME_RE
from registry.queries import list_deliveries, list_rejects, trajectory
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
