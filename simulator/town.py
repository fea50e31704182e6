"""A small, seeded town: stations on a street grid, bikes riding between them.

Deterministic for a seed. Bikes ride along grid streets at 12 to 25 km/h; a
station hears a tag within `range_m` with probability `p_read` each second,
with an RSSI that falls with distance. Everything per tick is array work over
all bikes at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from registry.tags import format_tag

Reads = tuple[np.ndarray, np.ndarray, np.ndarray]  # tags (u64), ts_ms (i64), rssi (i8)
ORIGIN = (28.7300, 121.5500)  # lat, lon of the grid's south-west corner
M_PER_DEG_LAT = 111_320.0
BRANDS = ("Yadea", "Aima", "Tailg", "Niu", "Luyuan", "Sunra")
COLORS = ("white", "black", "red", "blue", "grey", "green")
ZONES = ("shangpan", "xiaozhi", "dongcheng", "xicheng")


@dataclass(slots=True)
class Town:
    seed: int = 7
    rows: int = 4
    cols: int = 4
    bikes: int = 300
    spacing_m: float = 400.0
    range_m: float = 45.0
    p_read: float = 0.7
    rng: np.random.Generator = field(init=False)
    station_ids: list[str] = field(init=False)
    tags: np.ndarray = field(init=False)
    # per bike: current edge (from node, to node), metres along it, speed m/s
    a: np.ndarray = field(init=False)
    b: np.ndarray = field(init=False)
    pos_m: np.ndarray = field(init=False)
    speed: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        n_nodes = self.rows * self.cols
        self.station_ids = [f"SP-{i:04d}" for i in range(n_nodes)]
        self.tags = (np.uint64(0x00A10000) + self.rng.permutation(self.bikes * 4)[:self.bikes]
                     .astype(np.uint64))
        self.a = self.rng.integers(0, n_nodes, self.bikes)
        self.b = np.array([self.next_node(int(x), -1) for x in self.a])
        self.pos_m = self.rng.uniform(0, self.spacing_m, self.bikes)
        self.speed = self.rng.uniform(12, 25, self.bikes) / 3.6

    def _neighbours(self, node: int) -> list[int]:
        r, c = divmod(node, self.cols)
        out = []
        if r > 0:
            out.append(node - self.cols)
        if r < self.rows - 1:
            out.append(node + self.cols)
        if c > 0:
            out.append(node - 1)
        if c < self.cols - 1:
            out.append(node + 1)
        return out

    def next_node(self, node: int, came_from: int) -> int:
        """Where a bike at `node` turns next: any street but the one it came by."""
        choices = [n for n in self._neighbours(node) if n != came_from] or self._neighbours(node)
        return int(choices[int(self.rng.integers(0, len(choices)))])

    def latlon(self, node: int) -> tuple[float, float]:
        r, c = divmod(node, self.cols)
        lat = ORIGIN[0] + r * self.spacing_m / M_PER_DEG_LAT
        lon = ORIGIN[1] + c * self.spacing_m / (M_PER_DEG_LAT * math.cos(math.radians(ORIGIN[0])))
        return round(lat, 6), round(lon, 6)

    def zone(self, node: int) -> str:
        r, c = divmod(node, self.cols)
        return ZONES[(2 * r // self.rows) * 2 + (2 * c // self.cols)]

    def stations_csv(self) -> str:
        lines = ["id,name,lat,lon,zone"]
        for i, sid in enumerate(self.station_ids):
            r, c = divmod(i, self.cols)
            lat, lon = self.latlon(i)
            lines.append(f"{sid},Road {r + 1} / Street {c + 1},{lat},{lon},{self.zone(i)}")
        return "\n".join(lines) + "\n"

    def vehicles_csv(self) -> str:
        lines = ["tag,plate,owner_name,owner_phone,brand,color"]
        for i, tag in enumerate(self.tags.tolist()):
            lines.append(f"{format_tag(tag)},ZJ-J{10000 + i},Owner {i},"
                         f"138{int(self.rng.integers(0, 10**8)):08d},"
                         f"{BRANDS[i % len(BRANDS)]},{COLORS[(i // 7) % len(COLORS)]}")
        return "\n".join(lines) + "\n"

    def step(self, dt_s: float, now_ms: int) -> dict[str, Reads]:
        """Move every bike by `dt_s`; the reads heard, per station: (tags, ts_ms, rssi)."""
        self.pos_m += self.speed * dt_s
        done = np.flatnonzero(self.pos_m >= self.spacing_m)
        for i in done.tolist():  # bikes reaching a crossing: a few per tick
            self.pos_m[i] -= self.spacing_m
            prev, self.a[i] = self.a[i], self.b[i]
            self.b[i] = self.next_node(int(self.a[i]), int(prev))
        out: dict[str, Reads] = {}
        for node_of, dist in ((self.a, self.pos_m), (self.b, self.spacing_m - self.pos_m)):
            near = (dist < self.range_m) & (self.rng.random(self.bikes) < self.p_read)
            idx = np.flatnonzero(near)
            if not len(idx):
                continue
            rssi = (-45 - 40 * dist[idx] / self.range_m
                    + self.rng.normal(0, 3, len(idx))).clip(-127, -1).astype(np.int8)
            ts = now_ms - self.rng.integers(0, int(dt_s * 1000), len(idx))
            for node in np.unique(node_of[idx]).tolist():
                sel = node_of[idx] == node
                sid = self.station_ids[node]
                prev_t = out.get(sid)
                t, s, r = self.tags[idx][sel], ts[sel].astype(np.int64), rssi[sel]
                if prev_t is not None:
                    t = np.concatenate([prev_t[0], t])
                    s = np.concatenate([prev_t[1], s])
                    r = np.concatenate([prev_t[2], r])
                out[sid] = (t, s, r)
        return out

    def moving_bike(self) -> int:
        """A bike about to reach a crossing: a good one to steal for a quick demo."""
        left = (self.spacing_m - self.pos_m) / self.speed
        return int(self.tags[int(np.argmin(left))])
