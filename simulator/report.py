"""One report of a `bikewatch bench` run: every figure beside its baseline from the same
run, printed as a table at the end and written as JSON (`--json FILE`), with the
machine it was measured on. These machines are shared and noisy: compare ratios,
not raw figures, across runs."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True, frozen=True)
class Figure:
    section: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None


@dataclass(slots=True)
class Report:
    figures: list[Figure] = field(default_factory=list)

    def add(self, section: str, name: str, value: float, unit: str,
            baseline: float | None = None, baseline_name: str = "") -> None:
        self.figures.append(Figure(section, name, float(value), unit,
                                   None if baseline is None else float(baseline),
                                   baseline_name))

    def as_json(self) -> dict[str, Any]:
        return {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": machine(),
                "figures": [asdict(f) | {"ratio": f.ratio} for f in self.figures]}

    def write(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.as_json(), indent=2) + "\n")

    def table(self) -> str:
        labels = [f"{f.section}: {f.name}" for f in self.figures]
        wide = max(map(len, labels), default=6)  # whole labels: cut, two read the same
        lines = [f"{'figure':<{wide}} {'value':>12} {'unit':<9} {'baseline':>12}  ratio  "
                 "baseline is"]
        for label, f in zip(labels, self.figures, strict=True):
            base = "" if f.baseline is None else _num(f.baseline)
            ratio = "" if f.ratio is None else f"{f.ratio:.2f}"
            lines.append(f"{label:<{wide}} {_num(f.value):>12} "
                         f"{f.unit:<9} {base:>12} {ratio:>6}  {f.baseline_name}")
        return "\n".join(lines)


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                      .splitlines() if line.startswith("MemTotal"))
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "system": platform.platform()}
