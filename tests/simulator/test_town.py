"""The simulated town: deterministic for a seed, and behaving like a town."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ingest.codec import decode
from ingest.errors import Rejected
from simulator import malformed
from simulator.day import HOUR_MS, Scenario, local_ms, plan
from simulator.town import Town

START = 1_763_800_000_000


def _day(seed: int, **scenario: float) -> tuple[Town, object]:
    town = Town(seed=seed, stations=30, bikes=1_500)
    return town, plan(town, START, START + 24 * HOUR_MS, 0,
                      Scenario(**scenario))  # type: ignore[arg-type]


def test_the_same_seed_makes_the_same_day_and_another_seed_another() -> None:
    _, a = _day(3, theft_rate=0.3, outage_rate=1.0)
    _, b = _day(3, theft_rate=0.3, outage_rate=1.0)
    _, c = _day(4, theft_rate=0.3, outage_rate=1.0)
    for col in ("station", "tag", "ts_ms", "rssi", "flags"):
        assert np.array_equal(getattr(a.reads, col), getattr(b.reads, col))  # type: ignore[attr-defined]
    assert dataclasses.asdict(a.truth) == dataclasses.asdict(b.truth)  # type: ignore[attr-defined]
    assert not np.array_equal(a.reads.tag[:1000], c.reads.tag[:1000])  # type: ignore[attr-defined]


def test_stations_cluster_at_hotspots_and_stand_at_the_spacing() -> None:
    town = Town(seed=1, stations=30, spacing_m=400, block_m=200)
    g = town.grid
    nodes = town.station_node.tolist()
    assert len(set(nodes)) == len(nodes) == 30
    for h in town.hotspots:
        assert h.node in nodes  # every hotspot has a station, and a neighbour has one too
        assert any(n in nodes for n in g.neighbours(h.node))
    lattice = [n for n in nodes if all(x % 2 == 0 for x in g.rc(n))]
    assert len(lattice) >= 30 - 3 * len(town.hotspots)
    assert {g.zone(n) for n in nodes} == {"shangpan", "xiaozhi", "dongcheng", "xicheng"}
    assert town.stations_csv().splitlines()[0] == "id,name,lat,lon,zone,community"


def test_routines_make_peaks_and_quiet_nights_and_passes_make_several_reads() -> None:
    town, p = _day(5, theft_rate=0, outage_rate=0)
    r = p.reads  # type: ignore[attr-defined]
    hour = np.array([local_ms(START, int(t)) // HOUR_MS for t in r.ts_ms])
    per_hour = np.bincount(hour, minlength=24)
    assert per_hour[7:9].sum() > 10 * per_hour[1:5].sum()   # the morning peak
    assert per_hour[17:19].sum() > 10 * per_hour[1:5].sum()  # the evening one
    assert ((r.rssi <= -1) & (r.rssi >= -127)).all()
    # a pass is several reads of one tag at one station within seconds
    key = r.tag.astype(np.int64) * 1000 + r.station
    _, counts = np.unique(key, return_counts=True)
    assert np.median(counts) >= 4
    # RSSI falls with distance: the strongest read of a pass is near its middle
    assert r.rssi.mean() < -50 and r.rssi.max() > -50
    assert len(np.unique(r.tag)) > 0.8 * town.bikes


def test_thefts_happen_at_night_near_hotspots_and_ride_to_a_fence() -> None:
    town, p = _day(8, theft_rate=1.0, outage_rate=0, p_cut=0.5)
    thefts = p.truth.thefts  # type: ignore[attr-defined]
    assert len(thefts) >= 15
    night = [th for th in thefts if th.night]
    assert len(night) > len(thefts) / 2
    assert all(th.reported_ms > th.stolen_ms for th in thefts)
    assert any(th.reported_ms - th.stolen_ms > 2 * HOUR_MS for th in night)  # found next morning
    fences = {h.name for h in town.fences()}
    assert {th.fence for th in thefts} <= fences
    cut = [th for th in thefts if th.cut_ms is not None]
    assert cut, "some tags are cut off on the way"
    for th in cut:  # the cut tag says so once, then is never heard again
        heard = [ps for ps in th.passes if ps.reads]
        assert heard[-1].tamper and not any(ps.tamper for ps in heard[:-1])
        assert all(ps.at_ms <= th.cut_ms + 60_000 for ps in heard)
    r = p.reads  # type: ignore[attr-defined]
    for th in thefts:  # after the theft, the bike is heard only on the thief's rides
        after = r.ts_ms[(r.tag == th.tag) & (r.ts_ms > th.stolen_ms)]
        assert len(after) == sum(ps.reads for ps in th.passes)


def test_outages_cut_reads_and_stay_in_the_window() -> None:
    town, p = _day(9, theft_rate=0, outage_rate=2.0)
    truth = p.truth  # type: ignore[attr-defined]
    kinds = {o.kind for o in truth.outages}
    assert kinds == {"power", "uplink", "flap"}
    r = p.reads  # type: ignore[attr-defined]
    index = {sid: i for i, sid in enumerate(town.station_ids)}
    for o in truth.outages:
        assert START <= o.start_ms < o.end_ms <= START + 24 * HOUR_MS
        inside = (r.station == index[o.station]) & (r.ts_ms >= o.start_ms) & (r.ts_ms < o.end_ms)
        if o.kind == "uplink":
            continue  # heard, and sent late
        assert not inside.any(), f"a station without power heard reads: {o}"
    assert len(truth.skews) == 30 // 20


@pytest.mark.parametrize(("kind", "reason", "counted"), malformed.KINDS)
def test_every_malformed_kind_is_rejected_for_its_reason(kind: str, reason: str,
                                                         counted: str) -> None:
    payload = malformed.make(kind, "SP-0001", 1, malformed.BAD_SEQ_BASE, START)
    if counted == "payload":
        with pytest.raises(Rejected) as rej:
            decode(payload, "SP-0001", START)
        assert rej.value.reason == reason
    else:
        batch = decode(payload, "SP-0001", START)
        assert len(batch) == 0 and (batch.bad_tag if reason == "bad_tag" else
                                         batch.bad_value) == 1
