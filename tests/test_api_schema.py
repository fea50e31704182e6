"""Schemathesis against the served /openapi.json: every operation called with data
generated from its schema (each with a token of a role it admits), and no answer is a
500, an undocumented status, the wrong content type or off its schema."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ingest.broker import free_port
from ingest.clock import wall_ms
from ingest.config import Settings
from ingest.http import build_app
from registry.db import open_database
from registry.imports import import_stations, import_vehicles
from registry.tokens import ROLES, create_token
from tests.helpers import STATIONS, VEHICLES
from tests.test_api_roles import MATRIX, PUBLIC

CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance,
          content_type_conformance, response_schema_conformance]


class Served:
    """The real app under uvicorn on loopback, in a thread with its own event loop."""

    def __init__(self, db_url: str) -> None:
        self.db_url, self.port = db_url, free_port()
        self.tokens: dict[str, str] = {}
        self._ready = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(20), "the API did not start"

    async def _main(self) -> None:
        engine = await open_database(self.db_url)
        now = wall_ms()
        await import_stations(engine, STATIONS, now)
        await import_vehicles(engine, VEHICLES)
        self.tokens = {r: await create_token(engine, r, f"fuzz-{r}", now) for r in ROLES}
        ended = asyncio.Event()
        ended.set()  # the alert stream answers, then ends
        app = build_app(engine, lambda: b"# no worker\n", Settings.load(None, {}), stop=ended)
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off"))
        task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            await asyncio.sleep(0.02)
        self._ready.set()
        await task
        await engine.dispose()

    def close(self) -> None:
        assert self._server is not None
        self._server.should_exit = True
        self._thread.join(15)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    db = Path(tmp_path_factory.mktemp("fuzz")) / "bikewatch.db"
    api = Served(f"sqlite+aiosqlite:///{db}")
    yield api
    api.close()


@pytest.fixture(scope="module")
def api_schema(served: Served) -> Any:
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{served.port}/openapi.json")


@pytest.mark.parametrize(("method", "path"), sorted(MATRIX))
def test_every_operation_answers_by_its_schema(method: str, path: str, served: Served,
                                               api_schema: Any) -> None:
    admitted = MATRIX[method, path]
    token = served.tokens["ops" if admitted is PUBLIC else sorted(admitted)[0]]
    operation = api_schema[path][method.lower()]

    @given(operation.as_strategy())
    @settings(max_examples=25, deadline=None, database=None, derandomize=True,  # CI repeats
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def fuzz(case: Any) -> None:
        case.call_and_validate(headers={"authorization": f"Bearer {token}"}, checks=CHECKS)

    fuzz()


def test_every_operation_is_fuzzed(served: Served) -> None:
    import httpx

    doc = httpx.get(f"http://127.0.0.1:{served.port}/openapi.json").json()
    assert {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops} == set(MATRIX)
    assert all(re.match(r"^/", p) for p in doc["paths"])
