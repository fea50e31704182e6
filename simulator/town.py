"""A seeded town: streets, stations, hotspots, zones, communities and bikes.

Deterministic for a seed. Stations stand at crossings: clustered at the named
hotspots (markets, schools, and the fence areas where stolen bikes are sold
on), then on a lattice `spacing_m` apart, arterials first, until there are as
many as asked for. Every bike has a tag, a home and a workplace, each in the
middle of a block (out of every station's range, so a parked bike is not
heard); `simulator.day` plans what they do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from registry.tags import format_tag
from simulator.roads import Grid

BRANDS = ("Yadea", "Aima", "Tailg", "Niu", "Luyuan", "Sunra")
COLORS = ("white", "black", "red", "blue", "grey", "green")
# (name, kind, where in the town as a fraction of rows and columns)
HOTSPOTS = (("East Market", "market", 0.45, 0.6), ("Night Market", "market", 0.6, 0.35),
            ("No. 2 Middle School", "school", 0.25, 0.3), ("Harbour School", "school", 0.7, 0.75),
            ("Old Rail Yard", "fence", 0.05, 0.95), ("West Scrap Lanes", "fence", 0.95, 0.05))


class Hotspot(NamedTuple):
    name: str
    kind: str
    node: int


class Place(NamedTuple):
    """The middle of the block between crossings a and b."""
    a: int
    b: int


@dataclass(slots=True)
class Town:
    seed: int = 7
    stations: int = 40
    bikes: int = 2_000
    spacing_m: float = 400.0
    block_m: float = 200.0
    range_m: float = 40.0
    p_read: float = 0.8
    grid: Grid = field(init=False)
    hotspots: list[Hotspot] = field(init=False)
    station_ids: list[str] = field(init=False)
    station_names: list[str] = field(init=False)
    station_node: np.ndarray = field(init=False)    # per station: its crossing
    node_station: np.ndarray = field(init=False)    # per crossing: its station, or -1
    tags: np.ndarray = field(init=False)            # uint64, per bike
    home: list[Place] = field(init=False)
    work: list[Place] = field(init=False)

    def __post_init__(self) -> None:
        if self.stations < 1 or self.bikes < 1:
            raise ValueError("a town needs at least one station and one bike")
        rng = np.random.default_rng(self.seed)
        k = max(1, round(self.spacing_m / self.block_m))
        side = max(9, k * math.ceil(math.sqrt(self.stations)) + 1)
        self.grid = g = Grid(side, side, self.block_m)
        self.hotspots = [Hotspot(name, kind, g.node(round(fr * (side - 1)), round(fc * (side - 1))))
                         for name, kind, fr, fc in HOTSPOTS]
        chosen: dict[int, str] = {}
        for h in self.hotspots:
            chosen.setdefault(h.node, h.name)
            for i, n in enumerate(g.neighbours(h.node)[:2]):
                chosen.setdefault(n, f"{h.name} ({'NS'[i]})")
        centre = (side - 1) / 2
        lattice = sorted((n for n in range(g.nodes) if all(x % k == 0 for x in g.rc(n))),
                         key=lambda n: (not g.arterial(n),
                                        abs(g.rc(n)[0] - centre) + abs(g.rc(n)[1] - centre), n))
        for n in lattice:
            r, c = g.rc(n)
            chosen.setdefault(n, f"Road {r + 1} / Street {c + 1}")
        nodes = list(chosen)[:self.stations]
        self.station_node = np.array(nodes, dtype=np.int64)
        self.station_names = [chosen[n] for n in nodes]
        self.station_ids = [f"SP-{i + 1:04d}" for i in range(len(nodes))]
        self.node_station = np.full(g.nodes, -1, dtype=np.int64)
        self.node_station[self.station_node] = np.arange(len(nodes))
        self.tags = (np.uint64(0x00A10000) + rng.permutation(self.bikes * 4)[:self.bikes]
                     .astype(np.uint64))
        self.home = [self.random_place(rng) for _ in range(self.bikes)]
        self.work = []
        for home in self.home:
            w = self.random_place(rng)
            while not 4 <= g.blocks(w.a, home.a) <= 3 * side // 2:
                w = self.random_place(rng)
            self.work.append(w)

    def random_place(self, rng: np.random.Generator, near: int | None = None,
                     blocks: int = 2) -> Place:
        """A block anywhere, or within `blocks` of crossing `near`."""
        g = self.grid
        while True:
            if near is None:
                a = int(rng.integers(0, g.nodes))
            else:
                r0, c0 = g.rc(near)
                r = int(np.clip(r0 + rng.integers(-blocks, blocks + 1), 0, g.rows - 1))
                c = int(np.clip(c0 + rng.integers(-blocks, blocks + 1), 0, g.cols - 1))
                a = g.node(r, c)
            nbrs = g.neighbours(a)
            return Place(a, nbrs[int(rng.integers(0, len(nbrs)))])

    def near_hotspot(self, place: Place, kinds: tuple[str, ...], blocks: int = 2) -> bool:
        return any(h.kind in kinds and self.grid.blocks(h.node, place.a) <= blocks
                   for h in self.hotspots)

    def fences(self) -> list[Hotspot]:
        return [h for h in self.hotspots if h.kind == "fence"]

    def station_latlon(self, station: int) -> tuple[float, float]:
        return self.grid.latlon(int(self.station_node[station]))

    def stations_csv(self) -> str:
        lines = ["id,name,lat,lon,zone,community"]
        for i, sid in enumerate(self.station_ids):
            node = int(self.station_node[i])
            lat, lon = self.grid.latlon(node)
            lines.append(f"{sid},{self.station_names[i]},{lat},{lon},{self.grid.zone(node)},"
                         f"{self.grid.community(node)}")
        return "\n".join(lines) + "\n"

    def vehicles_csv(self) -> str:
        rng = np.random.default_rng(self.seed + 1)
        lines = ["tag,plate,owner_name,owner_phone,brand,color,community"]
        for i, tag in enumerate(self.tags.tolist()):
            lines.append(f"{format_tag(tag)},ZJ-J{10000 + i},Owner {i},"
                         f"138{int(rng.integers(0, 10**8)):08d},"
                         f"{BRANDS[i % len(BRANDS)]},{COLORS[(i // 7) % len(COLORS)]},"
                         f"{self.grid.community(self.home[i].a)}")
        return "\n".join(lines) + "\n"
