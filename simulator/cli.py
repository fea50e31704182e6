"""`bikewatch simulate` and `bikewatch bench`: their options and their entry point."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ingest.config import Settings


def add_simulate_parser(sub: Any) -> None:
    p = sub.add_parser("simulate", help="publish a simulated town's traffic to a broker")
    p.add_argument("--rows", type=int, default=4, help="street grid rows (stations = rows*cols)")
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--bikes", type=int, default=300)
    p.add_argument("--speedup", type=float, default=1.0, help="simulated seconds per second")
    p.add_argument("--duration", type=float, default=60.0, help="wall seconds (0: until ^C)")
    p.add_argument("--binary-share", type=float, default=0.8,
                   help="share of batches sent binary, the rest JSON")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--csv-dir", metavar="DIR",
                   help="also write stations.csv and vehicles.csv of the town here")


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure matching, decoding and end-to-end throughput")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each end-to-end run")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--skip-e2e", action="store_true", help="only the in-process figures")
    p.add_argument("--db-url", metavar="URL",
                   help="database for the end-to-end runs (default: a temporary SQLite file)")
    p.add_argument("--soak", type=float, default=0, metavar="S",
                   help="also run the worker at full load for S seconds, RSS at start and end")
    p.add_argument("--json", metavar="FILE", help="also write every figure, its baseline and "
                   "the machine to FILE as JSON")
    p.add_argument("--registry-vehicles", type=int, default=None, metavar="N",
                   help="vehicles imported for the registry figures (default 1,000,000; "
                        "20,000 with --quick; 0 skips them)")


async def run_simulator_command(args: argparse.Namespace, settings: Settings,
                                stop: asyncio.Event) -> int:
    if args.command == "bench":
        from simulator.bench import run_bench

        return await run_bench(args, settings, stop)
    from pathlib import Path

    from simulator.publisher import StationPublisher
    from simulator.run import drive
    from simulator.town import Town

    town = Town(seed=args.seed, rows=args.rows, cols=args.cols, bikes=args.bikes)
    if args.csv_dir:
        out = Path(args.csv_dir)

        def write() -> None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "stations.csv").write_text(town.stations_csv())
            (out / "vehicles.csv").write_text(town.vehicles_csv())

        await asyncio.to_thread(write)
    pub = StationPublisher(settings.mqtt_endpoint(), settings.mqtt_root,
                           binary_share=args.binary_share)
    try:
        await asyncio.to_thread(pub.connect)
    except OSError as exc:
        from ingest.errors import ConfigError

        raise ConfigError("BIKEWATCH_MQTT_URL", f"cannot connect: {exc}") from None
    try:
        await drive(town, pub, stop, duration_s=args.duration, speedup=args.speedup)
    finally:
        pub.close()
    print(f"sent {pub.sent_batches} batches, {pub.sent_reads} reads")
    return 0
