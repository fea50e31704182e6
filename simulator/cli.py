"""`bikewatch simulate` and `bikewatch bench`: their options and their entry point."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ingest.config import Settings
from ingest.errors import UsageError


def add_simulate_parser(sub: Any) -> None:
    p = sub.add_parser("simulate", help="publish a simulated town's traffic to a broker")
    p.add_argument("--stations", type=int, default=40)
    p.add_argument("--bikes", type=int, default=2_000)
    p.add_argument("--spacing", type=float, default=400.0, metavar="M",
                   help="metres between stations along a road")
    p.add_argument("--speedup", type=float, default=1.0,
                   help="simulated seconds per second; above 1 the simulated window ends now")
    p.add_argument("--duration", type=float, default=60.0, metavar="S",
                   help="wall seconds (0: until ^C, speed-up 1 only)")
    p.add_argument("--start", default="07:00", metavar="HH:MM",
                   help="the town's clock when the run starts")
    p.add_argument("--theft-rate", type=float, default=1.0, metavar="PER_HOUR",
                   help="thefts per simulated hour")
    p.add_argument("--outage-rate", type=float, default=0.5, metavar="PER_DAY",
                   help="outages per station per simulated day")
    p.add_argument("--bad-rate", type=float, default=0.01, metavar="SHARE",
                   help="malformed payloads per good batch")
    p.add_argument("--binary-share", type=float, default=0.8,
                   help="share of batches sent binary, the rest JSON")
    p.add_argument("--skewed", type=int, default=-1, metavar="N",
                   help="stations with wrong clocks (default: one in twenty)")
    p.add_argument("--clients", choices=("station", "shared"), default="station",
                   help="one MQTT client per station, each with its Last Will, or one shared")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--truth", metavar="FILE", help="write the ground truth here, for "
                   "`bikewatch score`")
    p.add_argument("--register", action="store_true",
                   help="import the town's stations and vehicles into the registry first")
    p.add_argument("--no-reports", action="store_true",
                   help="do not file the owners' reports and recoveries in the registry")
    p.add_argument("--csv-dir", metavar="DIR",
                   help="also write stations.csv and vehicles.csv of the town here")


def add_score_parser(sub: Any) -> None:
    p = sub.add_parser("score", help="what bikewatch reported against a simulation's truth")
    p.add_argument("--truth", required=True, metavar="FILE")
    p.add_argument("--json", action="store_true")


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure matching, decoding and end-to-end throughput")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each end-to-end run")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--skip-e2e", action="store_true", help="only the in-process figures")
    p.add_argument("--db-url", metavar="URL",
                   help="database for the end-to-end runs (default: a temporary SQLite file)")
    p.add_argument("--soak", type=float, default=10.0, metavar="S",
                   help="run a worker in a process of its own for S seconds at the full load "
                        "measured before (its maximum), memory printed every minute (0: skip)")
    p.add_argument("--json", metavar="FILE", help="also write every figure, its baseline and "
                   "the machine to FILE as JSON")
    p.add_argument("--registry-vehicles", type=int, default=None, metavar="N",
                   help="vehicles imported for the registry figures (default 1,000,000; "
                        "20,000 with --quick; 0 skips them)")


def _clock(text: str) -> int:
    try:
        h, m = (int(x) for x in text.split(":"))
    except ValueError:
        h = m = -1
    if not (0 <= h < 24 and 0 <= m < 60):
        raise UsageError(f"--start {text!r} is not a time of day HH:MM")
    return (h * 60 + m) * 60_000


async def run_simulator_command(args: argparse.Namespace, settings: Settings,
                                stop: asyncio.Event) -> int:
    if args.command == "bench":
        from simulator.bench import run_bench

        return await run_bench(args, settings, stop)
    if args.command == "score":
        from simulator.session import score_command

        return await score_command(args, settings)
    from simulator.session import simulate_command

    return await simulate_command(args, settings, stop, _clock(args.start))
