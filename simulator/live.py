"""The terminal views: `bikewatch simulate`'s progress and `bikewatch demo`'s live view.

Both are rich renderables rebuilt from plain state a few times a second; on a
terminal that is not interactive (a log, CI) rich prints the final one only.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from simulator.day import local_ms
from simulator.run import Progress


def clock(midnight_ms: int, t_ms: int) -> str:
    """The town's clock at simulated time t_ms."""
    t = local_ms(midnight_ms, t_ms) // 1000
    return f"{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}"


def progress_view(p: Progress, midnight_ms: int, stations: int, speedup: float) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("town time", f"{clock(midnight_ms, p.sim_ms)} (x{speedup:g})")
    grid.add_row("reads sent", f"{p.reads:,} in {p.batches:,} batches, {p.rate:,.0f}/s now")
    grid.add_row("thefts", f"{p.staged} staged, {p.reported} reported")
    grid.add_row("stations", f"{stations - len(p.down)} of {stations} up"
                 + (f"; down: {', '.join(sorted(p.down)[:6])}" if p.down else ""))
    grid.add_row("bad payloads", f"{p.bad:,} sent")
    for e in p.events[-4:]:
        grid.add_row("", f"[dim]{e}[/]")
    return grid


def alert_line(alert: dict[str, Any], midnight_ms: int) -> str:
    st = alert.get("station") or {}
    traj = alert.get("trajectory") or []
    path = " → ".join(str(v["station"]) for v in traj[-6:])
    ahead = ", ".join(str(x) for x in (alert.get("next_stations") or [])[:3]) or "unknown"
    speed = alert.get("speed_kmh")
    return (f"[bold red]{alert['kind']}[/] case [bold]{alert.get('case_id') or '-'}[/] "
            f"#{alert.get('update', 1)} tag {alert['tag']} at [bold]{st.get('id')}[/] "
            f"({st.get('name', '')}, {st.get('zone', '')}) seen "
            f"{clock(midnight_ms, int(alert['seen_ms']))}"
            f"{' late' if alert.get('late') else ''}"
            f"{f', {speed} km/h' if speed is not None else ''}; path {path or '-'}; "
            f"next {ahead}")


def demo_view(p: Progress, midnight_ms: int, stations: int, online: float, target: float,
              stage: int, reads_total: float, read_rate: float,
              alerts: list[dict[str, Any]]) -> Group:
    head = progress_view(p, midnight_ms, stations, 1.0)
    mark = "[green]meets[/]" if online >= target else "[red]below[/]"
    head.add_row("online ratio", f"{online:.1%} ({mark} the stage {stage} target {target:.0%})")
    head.add_row("bikewatch", f"{reads_total:,.0f} reads accepted, {read_rate:,.0f}/s")
    latest = Table.grid()
    for a in alerts[-5:]:
        latest.add_row(alert_line(a, midnight_ms))
    if not alerts:
        latest.add_row("[dim]no alert yet: the first theft is staged within half a minute[/]")
    return Group(Panel(head, title="bikewatch demo", border_style="blue"),
                 Panel(latest, title=f"latest alerts ({len(alerts)} in all)",
                       border_style="red"))

