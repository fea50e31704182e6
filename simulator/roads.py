"""The road network: a street grid with arterials, and routes along it.

Crossings are nodes `r * cols + c`, `block_m` apart. Every `arterial_every`-th
row and column is an arterial; a route between two crossings takes the
arterials where that is no longer than the direct L-shaped way by more than a
block or two, as riders do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ORIGIN = (28.7300, 121.5500)  # lat, lon of the grid's south-west corner (Taizhou, Zhejiang)
M_PER_DEG_LAT = 111_320.0
ZONES = ("shangpan", "xiaozhi", "dongcheng", "xicheng")


@dataclass(slots=True, frozen=True)
class Grid:
    rows: int
    cols: int
    block_m: float = 200.0
    arterial_every: int = 4

    @property
    def nodes(self) -> int:
        return self.rows * self.cols

    def rc(self, node: int) -> tuple[int, int]:
        return divmod(node, self.cols)

    def node(self, r: int, c: int) -> int:
        return r * self.cols + c

    def latlon(self, node: int) -> tuple[float, float]:
        r, c = self.rc(node)
        lat = ORIGIN[0] + r * self.block_m / M_PER_DEG_LAT
        lon = ORIGIN[1] + c * self.block_m / (M_PER_DEG_LAT * math.cos(math.radians(ORIGIN[0])))
        return round(lat, 6), round(lon, 6)

    def zone(self, node: int) -> str:
        """Four police zones, one per quarter of the town."""
        r, c = self.rc(node)
        return ZONES[(2 * r // self.rows) * 2 + (2 * c // self.cols)]

    def community(self, node: int) -> str:
        r, c = self.rc(node)
        return f"C{r // 4:02d}{c // 4:02d}"

    def arterial(self, node: int) -> bool:
        r, c = self.rc(node)
        return r % self.arterial_every == 0 or c % self.arterial_every == 0

    def neighbours(self, node: int) -> list[int]:
        r, c = self.rc(node)
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

    def blocks(self, a: int, b: int) -> int:
        (ra, ca), (rb, cb) = self.rc(a), self.rc(b)
        return abs(ra - rb) + abs(ca - cb)

    def _straight(self, a: int, b: int) -> list[int]:
        """a to b along one row or one column (they share it), a excluded."""
        (ra, ca), (rb, cb) = self.rc(a), self.rc(b)
        if ra == rb:
            step = 1 if cb > ca else -1
            return [self.node(ra, c) for c in range(ca + step, cb + step, step)]
        step = 1 if rb > ra else -1
        return [self.node(r, ca) for r in range(ra + step, rb + step, step)]

    def route(self, a: int, b: int, rng: np.random.Generator) -> list[int]:
        """Crossings from a to b, both included: an L along an arterial where one is near."""
        (ra, ca), (rb, cb) = self.rc(a), self.rc(b)
        k = self.arterial_every
        near_row = min((ra // k) * k, min(((ra // k) + 1) * k, self.rows - 1),
                       key=lambda r: abs(r - ra) + abs(r - rb))
        via = [(ra, ca), (near_row, ca), (near_row, cb), (rb, cb)]
        if abs(near_row - ra) + abs(near_row - rb) > abs(ra - rb) + 2 or rng.random() < 0.3:
            turn = (ra, cb) if rng.random() < 0.5 else (rb, ca)  # no arterial near: an L
            via = [(ra, ca), turn, (rb, cb)]
        path = [a]
        for r, c in via[1:]:
            nxt = self.node(r, c)
            if nxt != path[-1]:
                path += self._straight(path[-1], nxt)
        return path
