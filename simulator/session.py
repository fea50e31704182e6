"""A simulation session: plan the town's windows, play them onto the broker, keep the
truth. `bikewatch simulate`, `bikewatch score` and `bikewatch demo` run on it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from rich.console import Console
from rich.live import Live
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.clock import wall_ms
from ingest.config import Settings
from ingest.errors import ConfigError, UsageError
from registry.db import open_database
from registry.imports import import_stations, import_vehicles
from simulator.day import DAY_MS, Scenario, plan
from simulator.live import progress_view
from simulator.run import SETTLE_S, Clerk, Fleet, Progress, Runner
from simulator.score import score
from simulator.town import Town
from simulator.truth import Truth

console = Console(highlight=False, soft_wrap=True)  # a log line stays one line


@dataclass(slots=True)
class Session:
    town: Town
    fleet: Fleet
    clerk: Clerk | None
    scenario: Scenario
    speedup: float
    bad_rate: float
    day_start_ms: int                 # the town's clock at the start, after midnight
    progress: Progress
    start_ms: int = 0                 # the first window's simulated start

    @property
    def midnight_ms(self) -> int:
        return self.start_ms - self.day_start_ms

    async def play(self, duration_s: float, stop: asyncio.Event) -> list[Truth]:
        """Windows of simulated time, one after another, until `duration_s` (wall
        seconds; 0: a day at a time until `stop`). Returns the truth of each."""
        now = wall_ms() + int(SETTLE_S * 1000)
        span = int(duration_s * self.speedup * 1000) if duration_s else DAY_MS
        self.start_ms = now - span if self.speedup > 1 else now
        halt = threading.Event()
        relay = asyncio.create_task(_relay(stop, halt))
        truths: list[Truth] = []
        try:
            await asyncio.to_thread(self.fleet.connect)
            start, day_start = self.start_ms, self.day_start_ms
            while not halt.is_set():
                p = await asyncio.to_thread(plan, self.town, start, start + span, day_start,
                                            self.scenario, len(truths))
                runner = Runner(p, self.fleet, self.clerk, speedup=self.speedup,
                                bad_rate=self.bad_rate, stop=halt, progress=self.progress)
                truths.append(await asyncio.to_thread(runner.run))
                if duration_s:
                    break
                start, day_start = start + span, (day_start + span) % DAY_MS
        finally:
            relay.cancel()
            await asyncio.to_thread(self.fleet.close)
        return truths


async def _relay(stop: asyncio.Event, halt: threading.Event) -> None:
    await stop.wait()
    halt.set()


async def register(engine: AsyncEngine, town: Town) -> str:
    r1 = await import_stations(engine, town.stations_csv(), wall_ms())
    r2 = await import_vehicles(engine, town.vehicles_csv())
    return f"{r1.summary('stations')}; {r2.summary('vehicles')}"


async def simulate_command(args: argparse.Namespace, settings: Settings, stop: asyncio.Event,
                           day_start_ms: int) -> int:
    if args.duration <= 0 and (args.speedup != 1 or args.truth):
        raise UsageError("--duration 0 (until ^C) is for --speedup 1 without --truth")
    if args.speedup <= 0 or not 0 <= args.bad_rate <= 1 or not 0 <= args.binary_share <= 1:
        raise UsageError("--speedup must be above 0, --bad-rate and --binary-share in 0..1")
    try:
        town = Town(seed=args.seed, stations=args.stations, bikes=args.bikes,
                    spacing_m=args.spacing)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.csv_dir:
        from pathlib import Path

        out = Path(args.csv_dir)

        def write() -> None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "stations.csv").write_text(town.stations_csv())
            (out / "vehicles.csv").write_text(town.vehicles_csv())

        await asyncio.to_thread(write)
    engine = None
    if args.register or not args.no_reports:
        engine = await open_database(settings.db_url)
    try:
        if engine is not None and args.register:
            console.print(f"registry: {await register(engine, town)}")
        fleet = Fleet(settings.mqtt_endpoint(), settings.mqtt_root, town.station_ids,
                      per_station=args.clients == "station", binary_share=args.binary_share,
                      client_prefix=f"bikewatch-sim-{args.seed}")
        session = Session(
            town, fleet, None if args.no_reports or engine is None
            else Clerk(engine, asyncio.get_running_loop()),
            Scenario(theft_rate=args.theft_rate, outage_rate=args.outage_rate,
                     skewed=args.skewed),
            args.speedup, args.bad_rate, day_start_ms, Progress())
        try:
            truths = await live(session, args.duration, stop, lambda: progress_view(
                session.progress, session.midnight_ms, len(town.station_ids), session.speedup))
        except OSError as exc:
            raise ConfigError("BIKEWATCH_MQTT_URL", f"cannot connect: {exc}") from None
    finally:
        if engine is not None:
            await engine.dispose()
    t = truths[-1] if truths else None
    if t is not None and args.truth:
        await asyncio.to_thread(t.write, args.truth)
        console.print(f"ground truth: {args.truth}")
    p = session.progress
    console.print(f"sent {p.reads:,} reads in {p.batches:,} batches, {p.bad:,} malformed "
                  f"payloads; {p.staged} thefts staged, {p.reported} reported")
    return 0


async def live(session: Session, duration_s: float, stop: asyncio.Event,
               view: Callable[[], object]) -> list[Truth]:
    """Play the session with `view` redrawn twice a second on a terminal."""
    play = asyncio.create_task(session.play(duration_s, stop))
    with Live(view(), console=console, refresh_per_second=4,  # type: ignore[arg-type]
              transient=False, redirect_stdout=False) as screen:
        while not play.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(play), 0.5)
            screen.update(view())  # type: ignore[arg-type]
    console.line()
    return await play


async def score_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        truth = await asyncio.to_thread(Truth.read, args.truth)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"{args.truth}: not a truth file of `bikewatch simulate` ({exc})"
                         ) from None
    engine = await open_database(settings.db_url)
    try:
        result = await score(engine, truth)
    finally:
        await engine.dispose()
    if args.json:
        sys.stdout.write(orjson.dumps(result.as_json(), option=orjson.OPT_INDENT_2).decode()
                         + "\n")
    else:
        for line in result.lines():
            console.print(line, markup=False)
    return 0 if result.met else 1
