"""Every bikewatch process, and the tests, run on uvloop (ingest.eventloop)."""

from __future__ import annotations

import asyncio

import uvloop

from ingest import eventloop


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_the_commands_run_on_uvloop() -> None:
    assert eventloop.run(_loop_type()) is uvloop.Loop


async def test_the_tests_run_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
