"""The registry at town scale: importing vehicles from CSV, and looking one up by tag
and by plate with millions stored.

Each figure stands beside a baseline from the same run on the same machine: the
import beside reading the same CSV with the `csv` module alone (the floor any
import pays), the lookups beside a bare primary-key select on the same database
(the floor of a lookup). Lookups go through the API's own functions, as an ops
token (no audit) and as a police token (owner shown, one audit row written).
"""

from __future__ import annotations

import csv
import io
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import select, text

from registry.db import open_database
from registry.imports import import_vehicles
from registry.models import Vehicle
from registry.records import find_vehicles, get_vehicle
from registry.tags import format_tag, to_db
from registry.tokens import Principal
from simulator.report import Report

COMMUNITIES = 50
LOOKUPS = 2_000
HEADER = ("tag,plate,owner_name,owner_phone,brand,color,frame_no,model,community,"
          "owner_id_number\n")
_BRANDS = ("Yadea", "Aima", "Niu", "Tailg", "Luyuan", "Sunra")
_COLORS = ("white", "black", "red", "blue", "grey", "green")


def vehicles_csv(n: int, seed: int = 7) -> tuple[str, list[int], list[str]]:
    """A town's registry: n bikes, their owners (some with two bikes), tags and plates."""
    rng = random.Random(seed)
    tags = rng.sample(range(1, 1 << 40), n)
    plates = [f"ZJ-{'ABCDEFGHJK'[i % 10]}{i:07d}" for i in range(n)]
    out = io.StringIO()
    out.write(HEADER)
    for i, (tag, plate) in enumerate(zip(tags, plates, strict=True)):
        owner = i - (i % 4 == 3)  # every fourth bike belongs to the previous owner
        id_number = f"3301{owner:014d}" if owner % 2 else ""
        out.write(f"{tag:08x},{plate},Owner {owner},1{owner % 10**10:010d},"
                  f"{_BRANDS[i % 6]},{_COLORS[i % 6]},F{tag:012x},M{i % 40},"
                  f"c{i % COMMUNITIES:02d},{id_number}\n")
    return out.getvalue(), tags, plates


def _percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.array(samples) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


async def bench_registry(vehicles: int, db_url: str | None, report: Report) -> None:
    """Import `vehicles` into a fresh database, then time lookups."""
    print(f"\n## Registry: {vehicles:,} vehicles (SQLite unless --db-url)")
    text_csv, tags, plates = vehicles_csv(vehicles)
    started = time.perf_counter()
    rows = sum(1 for _ in csv.DictReader(io.StringIO(text_csv, newline="")))
    parse_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="bikewatch-bench-") as tmp:
        url = db_url or f"sqlite+aiosqlite:///{Path(tmp) / 'registry.db'}"
        engine = await open_database(url)
        try:
            started = time.perf_counter()
            imported = await import_vehicles(engine, text_csv)
            import_s = time.perf_counter() - started
            assert imported.added == rows == vehicles, imported.summary("vehicles")
            print(f"import: {vehicles / import_s:,.0f} rows/s, {import_s:.1f} s "
                  f"(csv module alone: {vehicles / parse_s:,.0f} rows/s; "
                  f"ratio {parse_s / import_s:.2f})")
            rng = random.Random(1)
            picks = [rng.randrange(vehicles) for _ in range(LOOKUPS)]
            floor = []
            async with engine.connect() as conn:
                for i in picks:
                    t0 = time.perf_counter()
                    (await conn.execute(select(Vehicle.tag).where(
                        Vehicle.tag == to_db(tags[i])))).one()
                    floor.append(time.perf_counter() - t0)
            report.add("registry", f"CSV import, {vehicles:,} vehicles", vehicles / import_s,
                       "rows/s", vehicles / parse_s, "the csv module alone")
            p50, p99 = _percentiles(floor)
            print(f"bare primary-key select: p50 {p50:.2f} ms, p99 {p99:.2f} ms (baseline)")
            floor_p99 = p99
            for who in (Principal("bench-ops", "ops"), Principal("bench-police", "police")):
                by_tag, by_plate = [], []
                for i in picks:
                    t0 = time.perf_counter()
                    await get_vehicle(engine, who, tags[i], 0)
                    by_tag.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    found = await find_vehicles(engine, who, 0, plate=plates[i].lower())
                    by_plate.append(time.perf_counter() - t0)
                    assert [v["tag"] for v in found] == [format_tag(tags[i])]
                for what, samples in (("tag", by_tag), ("plate", by_plate)):
                    p50, p99 = _percentiles(samples)
                    print(f"lookup by {what} as {who.role}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
                    report.add("registry", f"lookup by {what} as {who.role}, p99, "
                               f"{vehicles:,} stored", p99, "ms", floor_p99,
                               "a bare primary-key select")
            async with engine.connect() as conn:
                size = (await conn.execute(text("SELECT count(*) FROM vehicles"))).scalar()
            assert size == vehicles
        finally:
            await engine.dispose()
