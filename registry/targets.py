"""The availability targets the towns judge their networks by: stations online at 95% in
the first year, 100% in the second (PROTOCOL.md section 5).

Configured as dated stages (`Settings.uptime_targets`); where none are configured,
stage 1 (0.95) runs from the first station's provisioning and stage 2 (1.00) from a
year later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

YEAR_MS = 365 * 86_400_000
DEFAULT_RATIOS = (0.95, 1.00)


@dataclass(slots=True, frozen=True)
class Target:
    stage: int      # 1-based, in date order
    ratio: float
    from_ms: int    # when this stage takes effect

    def __post_init__(self) -> None:
        if self.stage < 1 or not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"bad target stage {self.stage} ratio {self.ratio}")


@dataclass(slots=True, frozen=True)
class Targets:
    stages: tuple[Target, ...]

    @classmethod
    def build(cls, configured: Iterable[tuple[int, float]],
              first_provisioned_ms: int | None) -> Targets:
        """From `Settings.uptime_stages()`, or the default when that is empty."""
        pairs = sorted(configured)
        if not pairs:
            start = first_provisioned_ms or 0
            pairs = [(start, DEFAULT_RATIOS[0]), (start + YEAR_MS, DEFAULT_RATIOS[1])]
        return cls(tuple(Target(i + 1, ratio, at) for i, (at, ratio) in enumerate(pairs)))

    def at(self, ms: int) -> Target:
        """The stage in force at `ms`; before the first stage, the first."""
        current = self.stages[0]
        for stage in self.stages:
            if stage.from_ms <= ms:
                current = stage
        return current
