"""The `bikewatch` command (PROTOCOL.md section 4).

Exit codes: 0 done (also after a clean shutdown on SIGTERM), 1 refused,
2 bad usage or configuration. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ingest import eventloop
from ingest.clock import iso, parse_iso, wall_ms
from ingest.config import Settings
from ingest.errors import ConfigError, Reason, UsageError
from ingest.reports import FORMATS
from registry.errors import Refused, StoreError
from registry.queries import DELIVERY_STATES
from registry.tags import BadTag, format_tag, parse_tag
from registry.tokens import ROLES

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bikewatch", description="E-bike anti-theft platform")
    p.add_argument("--config", metavar="FILE", help="TOML settings (environment overrides it)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the worker, alert delivery, the HTTP API and "
                           "/metrics")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="N worker processes, HTTP on the configured port and the next "
                            "N-1 (default 1: this process)")
    demo = sub.add_parser("demo", help="the whole system on one machine, nothing installed")
    demo.add_argument("--duration", type=float, default=0, metavar="S",
                      help="stop after S seconds (default: run until Ctrl-C)")
    demo.add_argument("--data", metavar="DIR", help="keep the SQLite file here (default: temp)")
    demo.add_argument("--seed", type=int, default=7)

    stations = sub.add_parser("stations", help="the station registry").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    stations.add_parser("import", help="CSV with id,name,lat,lon,zone").add_argument("file")
    vehicles = sub.add_parser("vehicles", help="the vehicle registry").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    vehicles.add_parser("import", help="CSV with tag,plate,owner_name,owner_phone,brand,color"
                        ).add_argument("file")

    theft = sub.add_parser("theft", help="theft cases").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    report = theft.add_parser("report", help="put a registered vehicle on the stolen list")
    report.add_argument("--tag", required=True, metavar="HEX")
    report.add_argument("--case", required=True, metavar="ID")
    report.add_argument("--stolen-at", metavar="ISO8601")
    recover = theft.add_parser("recover", help="take a case off the stolen list")
    recover.add_argument("--case", required=True, metavar="ID")
    ack = theft.add_parser("ack", help="a patrol takes a case on (it keeps raising alerts)")
    ack.add_argument("--case", required=True, metavar="ID")
    for p_ in (report, recover, ack):
        p_.add_argument("--by", default="cli", metavar="NAME",
                        help="who makes the change, recorded with it (default: cli)")
    for p_ in (recover, ack):
        p_.add_argument("--note", default="", help="recorded with the change")

    traj = sub.add_parser("trajectory", help="a tag's station visits")
    traj.add_argument("--tag", required=True, metavar="HEX")
    traj.add_argument("--since", metavar="ISO8601")
    traj.add_argument("--json", action="store_true")

    rejects = sub.add_parser("rejects", help="the newest rejected payloads and reads")
    rejects.add_argument("--limit", type=int, default=20)
    rejects.add_argument("--reason", choices=[r.value for r in Reason])
    rejects.add_argument("--station")
    rejects.add_argument("--json", action="store_true")

    deliveries = sub.add_parser("deliveries", help="alerts to webhooks").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    listing = deliveries.add_parser("list", help="deliveries, newest first")
    listing.add_argument("--state", choices=DELIVERY_STATES)
    listing.add_argument("--webhook", metavar="NAME")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")
    deliveries.add_parser("retry", help="send dead-lettered alerts again").add_argument(
        "--webhook", metavar="NAME")

    reports = sub.add_parser("report", help="reports for operators").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    uptime = reports.add_parser("uptime", help="station availability against the target")
    uptime.add_argument("--from", dest="from_", metavar="ISO8601",
                        help="window start (default: 30 days before --to)")
    uptime.add_argument("--to", metavar="ISO8601", help="window end (default: now)")
    uptime.add_argument("--zone", help="one police zone only")
    uptime.add_argument("--format", choices=FORMATS, default="table")
    registration = reports.add_parser(
        "registration", help="per community: vehicles registered, heard, unknown tags heard")
    registration.add_argument("--days", type=float, default=30,
                              help="heard within this many days (default 30)")
    registration.add_argument("--format", choices=FORMATS, default="table")

    token = sub.add_parser("token", help="HTTP API tokens").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    create = token.add_parser("create", help="a new token; its secret is printed once")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", required=True, help="who or what uses it; unique")
    create.add_argument("--zone", action="append", default=[], metavar="ZONE",
                        help="limit a police token to this zone (repeat for several)")
    token.add_parser("revoke", help="the token stops working at once").add_argument("name")
    token.add_parser("list", help="every token, revoked ones too").add_argument(
        "--json", action="store_true")

    from simulator.cli import add_bench_parser, add_score_parser, add_simulate_parser

    add_simulate_parser(sub)
    add_score_parser(sub)
    add_bench_parser(sub)
    return p


def parse_time(text: str, settings: Settings, option: str) -> int:
    """ISO 8601 to epoch ms; a time without an offset is in the configured zone."""
    try:
        return parse_iso(text, settings.tz)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _tag(text: str) -> int:
    try:
        return parse_tag(text)
    except BadTag as exc:
        raise UsageError(f"--tag: {exc}") from None


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None


async def _with_db(settings: Settings, job: Callable[[Any], Awaitable[int]]) -> int:
    from registry.db import open_database

    engine = await open_database(settings.db_url)
    try:
        return await job(engine)
    finally:
        await engine.dispose()


async def _import(settings: Settings, kind: str, path: str) -> int:
    from registry.imports import import_stations, import_vehicles

    text = _read(path)

    async def job(engine: Any) -> int:
        with _progress(f"importing {kind}", text.count("\n") - 1) as advance:
            if kind == "stations":
                report = await import_stations(engine, text, wall_ms(), settings.tz, advance)
            else:
                report = await import_vehicles(engine, text, settings.tz, advance)
        for line, why in report.errors:
            print(f"{path}:{line}: {why}", file=sys.stderr)
        print(report.summary(kind))
        return EXIT_REFUSED if report.errors else EXIT_OK

    return await _with_db(settings, job)


async def _theft(settings: Settings, args: argparse.Namespace) -> int:
    from registry.cases import acknowledge_case, recover_theft, report_theft

    now = wall_ms()
    if not 0 < len(args.by) <= 100:
        raise UsageError("--by: 1 to 100 characters")
    if args.action == "report":
        tag = _tag(args.tag)
        stolen = parse_time(args.stolen_at, settings, "--stolen-at") if args.stolen_at else now

        async def job(engine: Any) -> int:
            print((await report_theft(engine, tag, args.case, stolen, now, args.by)).message)
            return EXIT_OK
    elif args.action == "ack":
        async def job(engine: Any) -> int:
            print((await acknowledge_case(engine, args.case, args.by, now, args.note)).message)
            return EXIT_OK
    else:
        async def job(engine: Any) -> int:
            print((await recover_theft(engine, args.case, now, args.by, args.note)).message)
            return EXIT_OK

    return await _with_db(settings, job)


async def _trajectory(settings: Settings, args: argparse.Namespace) -> int:
    from registry.queries import trajectory

    tag = _tag(args.tag)
    since = parse_time(args.since, settings, "--since") if args.since else 0

    async def job(engine: Any) -> int:
        visits = await trajectory(engine, tag, since)
        if args.json:
            print(json.dumps({"tag": format_tag(tag), "visits": visits}, indent=2))
            return EXIT_OK
        if not visits:
            print(f"no visits of {format_tag(tag)}")
        for v in visits:
            print(f"{iso(v['first_ms'])}  {iso(v['last_ms'])}  {v['station']:<16} "
                  f"{v['zone']:<12} reads={v['reads']} rssi={v['best_rssi']}")
        return EXIT_OK

    return await _with_db(settings, job)


async def _rejects(settings: Settings, args: argparse.Namespace) -> int:
    from registry.queries import list_rejects

    async def job(engine: Any) -> int:
        def line(r: dict[str, Any]) -> str:
            what = f"{r['reads']} read(s)" if r["reads"] else "payload"
            return (f"{iso(r['received_ms'])}  {r['station']:<16} {r['reason']:<16} "
                    f"{what:<12} boot={r['boot']} seq={r['seq']}  {r['detail']}  "
                    f"{r['payload_prefix'][:60]!r}")

        _print_rows(await list_rejects(engine, args.limit, args.reason, args.station),
                    args.json, "no rejects", line)
        return EXIT_OK

    return await _with_db(settings, job)


async def _deliveries(settings: Settings, args: argparse.Namespace) -> int:
    from registry.queries import list_deliveries, requeue_dead

    async def job(engine: Any) -> int:
        if args.action == "retry":
            n = await requeue_dead(engine, wall_ms(), args.webhook)
            print(f"{n} dead-lettered deliveries queued again")
            return EXIT_OK
        _print_rows(await list_deliveries(engine, args.state, args.webhook, args.limit),
                    args.json, "no deliveries", lambda r: (
                        f"{iso(r['created_ms'])}  {r['webhook']:<16} {r['state']:<9} "
                        f"attempts={r['attempts']:<3} {r['kind']} {r['case_id']} "
                        f"{r['alert_id']}  {r['last_error']}"))
        return EXIT_OK

    return await _with_db(settings, job)


async def _report(settings: Settings, args: argparse.Namespace) -> int:
    from ingest import reports

    async def job(engine: Any) -> int:
        try:
            if args.action == "uptime":
                report: Any = await reports.uptime_for(engine, settings, args.from_, args.to,
                                                       args.zone, wall_ms())
            else:
                report = await reports.coverage_for(engine, args.days, wall_ms())
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        out = reports.render(args.action, report, args.format,
                             shutil.get_terminal_size((100, 24)).columns)
        print(json.dumps(out, indent=2) if isinstance(out, dict) else out,
              end="" if isinstance(out, str) else "\n")
        return EXIT_OK

    return await _with_db(settings, job)


async def _token(settings: Settings, args: argparse.Namespace) -> int:
    from registry.tokens import create_token, list_tokens, revoke_token

    async def job(engine: Any) -> int:
        if args.action == "create":
            print(await create_token(engine, args.role, args.name, wall_ms(), args.zone))
        elif args.action == "revoke":
            done = await revoke_token(engine, args.name, wall_ms())
            print(f"token {args.name} {'revoked' if done else 'was already revoked'}")
        else:
            _print_rows(await list_tokens(engine), args.json, "no tokens", lambda r: (
                f"{r['name']:<24} {r['role']:<7} {','.join(r['zones']) or '-':<20} "
                f"created {iso(r['created_ms'])}"
                + (f"  revoked {iso(r['revoked_ms'])}" if r["revoked_ms"] else "")))
        return EXIT_OK

    return await _with_db(settings, job)


@contextlib.contextmanager
def _progress(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr for long jobs (none when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal or total < 10_000:
        yield lambda _done: None
        return
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(what, total=total)
        yield lambda done: bar.update(task, completed=done)


def _print_rows(rows: list[dict[str, Any]], as_json: bool, empty: str,
                line: Callable[[dict[str, Any]], str]) -> None:
    """A listing as JSON, or a line a row."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(empty)
    for r in rows:
        print(line(r))


async def _until_signalled(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    """Run `main(stop)`; SIGTERM and SIGINT set `stop` for a clean shutdown."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await main(stop) or EXIT_OK
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    match args.command:
        case "serve":
            from ingest.service import serve

            if args.workers < 1:
                raise UsageError("--workers must be at least 1")
            if args.workers > 1:
                from ingest.workers import supervise

                again = (["--config", args.config] if args.config else []) + (
                    ["-v"] if args.verbose else []) + ["serve"]
                return await _until_signalled(
                    lambda stop: supervise(settings, args.workers, again, stop))

            async def main(stop: asyncio.Event) -> int:
                await serve(settings, stop)
                return EXIT_OK

            return await _until_signalled(main)
        case "demo":
            from ingest.demo import run_demo

            return await _until_signalled(lambda stop: run_demo(args, stop))
        case "stations" | "vehicles":
            return await _import(settings, args.command, args.file)
        case "theft":
            return await _theft(settings, args)
        case "trajectory":
            return await _trajectory(settings, args)
        case "rejects":
            return await _rejects(settings, args)
        case "report":
            return await _report(settings, args)
        case "deliveries":
            return await _deliveries(settings, args)
        case "token":
            return await _token(settings, args)
        case "simulate" | "bench" | "score":
            from simulator.cli import run_simulator_command

            return await _until_signalled(lambda stop: run_simulator_command(args, settings,
                                                                             stop))
    raise UsageError(f"unknown command {args.command}")


# Database drivers and the HTTP client's wire trace log statements with their parameters,
# result rows or request bodies at INFO and DEBUG: owners' phones among them.
QUIET = ("sqlalchemy", "aiosqlite", "asyncpg", "httpcore")


def setup_logging(verbose: bool) -> None:
    """Our loggers at INFO with -v; the QUIET ones at WARNING whatever the level."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        args = build_parser().parse_args(argv)
        setup_logging(args.verbose)
        settings = Settings.load(args.config, environ)
        return eventloop.run(_run(args, settings))
    except UsageError as exc:
        print(f"bikewatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, StoreError) as exc:
        print(f"bikewatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Refused as exc:
        print(f"bikewatch: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
