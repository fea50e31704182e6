"""Folding reads into visits: the vectorized fold against a per-read reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.visits import RECENT_MOST, VisitTracker

GAP = 60_000


Row = tuple[int, str, int, int, int]


def _fold(tracker: VisitTracker, reads: list[tuple[int, str, int]]) -> list[Row]:
    tag = np.array([r[0] for r in reads], dtype=np.uint64)
    station = np.array([tracker.station_index(r[1]) for r in reads], dtype=np.int32)
    ts = np.array([r[2] for r in reads], dtype=np.int64)
    segs = tracker.fold(tag, station, ts, np.full(len(reads), -50, dtype=np.int8))
    return [(int(t), tracker.station_name(int(s)), int(f), int(la), int(n)) for t, s, f, la, n in
            zip(segs.tag, segs.station, segs.first_ms, segs.last_ms, segs.reads, strict=True)]


def _reference(reads: list[tuple[int, str, int]]) -> dict[tuple[int, str, int], tuple[int, int]]:
    """Visits by (tag, station, first): the contract read literally, one read at a time."""
    visits: dict[tuple[int, str, int], tuple[int, int]] = {}
    open_: dict[int, tuple[str, int, int]] = {}
    for tag, station, ts in sorted(reads, key=lambda r: (r[0], r[2])):
        cur = open_.get(tag)
        if cur and cur[0] == station and ts - cur[2] <= GAP:
            key = (tag, station, cur[1])
            last, n = visits[key]
            visits[key] = (max(last, ts), n + 1)
            open_[tag] = (station, cur[1], max(cur[2], ts))
        else:
            visits[(tag, station, ts)] = (ts, 1)
            open_[tag] = (station, ts, ts)
    return visits


class TestFold:
    @given(st.lists(st.lists(st.tuples(st.integers(1, 4), st.sampled_from("ABC"),
                                       st.integers(0, 4_000)), max_size=30), max_size=5),
           st.sampled_from([1, 2, RECENT_MOST]))
    @settings(max_examples=200)
    def test_groups_in_time_order_fold_like_the_reference(
            self, groups: list[list[tuple[int, str, int]]], recent_most: int) -> None:
        # Order the groups so that, per tag, no group goes back in time (late data is
        # the store's business, tested end to end).
        # Times are made distinct: two visits of one tag starting in the same
        # millisecond at one station would share a key, which no radio produces.
        flat = sorted(((t, s, ts * 100 + i) for i, (t, s, ts) in
                       enumerate(r for g in groups for r in g)), key=lambda r: r[2])
        sizes = [len(g) for g in groups]
        # A small `recent_most` merges the new tags' table into the other one mid-run.
        tracker = VisitTracker(GAP, recent_most=recent_most)
        got: dict[tuple[int, str, int], tuple[int, int]] = {}
        i = 0
        for n in sizes:
            for t, s, f, la, k in _fold(tracker, flat[i:i + n]):
                last, reads = got.get((t, s, f), (la, 0))
                got[(t, s, f)] = (max(last, la), reads + k)
            i += n
        assert got == _reference(flat)

    def test_a_bike_that_leaves_and_comes_back_starts_a_new_visit(self) -> None:
        tr = VisitTracker(GAP)
        _fold(tr, [(1, "A", 0), (1, "A", 10_000)])
        segs = tr.fold(np.array([1, 1], np.uint64),
                       np.array([tr.station_index("B"), tr.station_index("A")], np.int32),
                       np.array([20_000, 30_000], np.int64), np.zeros(2, np.int8))
        assert segs.opens.tolist() == [True, True]
        assert segs.first_ms.tolist() == [20_000, 30_000]

    def test_continuing_a_visit_keeps_its_key_and_does_not_open(self) -> None:
        tr = VisitTracker(GAP)
        _fold(tr, [(1, "A", 0)])
        segs = tr.fold(np.array([1], np.uint64), np.array([tr.station_index("A")], np.int32),
                       np.array([50_000], np.int64), np.zeros(1, np.int8))
        assert segs.opens.tolist() == [False] and segs.first_ms.tolist() == [0]

    def test_older_reads_are_marked_late(self) -> None:
        tr = VisitTracker(GAP)
        _fold(tr, [(1, "A", 500_000)])
        segs = tr.fold(np.array([1], np.uint64), np.array([tr.station_index("B")], np.int32),
                       np.array([100_000], np.int64), np.zeros(1, np.int8))
        assert segs.late.tolist() == [True]

    def test_older_reads_at_the_open_visits_station_join_it(self) -> None:
        """A station's batch folded after its next (Worker._watch writes a sighting
        first): its reads are of the visit open there, not a visit of their own."""
        tr = VisitTracker(GAP)
        _fold(tr, [(1, "A", 400_000)])
        _fold(tr, [(1, "A", 450_000)])  # open: 400,000 to 450,000
        segs = tr.fold(np.array([1, 1], np.uint64),
                       np.array([tr.station_index("A")] * 2, np.int32),
                       np.array([430_000, 470_000], np.int64), np.zeros(2, np.int8))
        assert segs.late.tolist() == [False] and segs.opens.tolist() == [False]
        assert segs.first_ms.tolist() == [400_000] and segs.last_ms.tolist() == [470_000]
        again = tr.fold(np.array([1], np.uint64), np.array([tr.station_index("A")], np.int32),
                        np.array([480_000], np.int64), np.zeros(1, np.int8))
        assert again.first_ms.tolist() == [400_000] and not again.late.any()
        # Older than the open visit by more than the gap: late, for the store to place.
        far = tr.fold(np.array([1], np.uint64), np.array([tr.station_index("A")], np.int32),
                      np.array([400_000 - GAP - 1], np.int64), np.zeros(1, np.int8))
        assert far.late.tolist() == [True]

    def test_memory_is_bounded(self) -> None:
        tr = VisitTracker(GAP, capacity=1000)
        for g in range(10):
            tags = np.arange(g * 1000, g * 1000 + 1000, dtype=np.uint64)
            tr.fold(tags, np.zeros(1000, np.int32), np.full(1000, g * 100_000, np.int64),
                    np.zeros(1000, np.int8))
            assert len(tr) <= 1000

    def test_a_new_tag_does_not_copy_the_open_visits_of_the_others(self) -> None:
        """A new tag goes into the table of tags first heard since the last prune: the
        large one is neither copied nor moved, whatever the town's size."""
        tr = VisitTracker(GAP)
        tags = np.arange(1, 10_001, dtype=np.uint64)
        tr.fold(tags, np.zeros(len(tags), np.int32), np.zeros(len(tags), np.int64),
                np.zeros(len(tags), np.int8))
        tr.prune(0)
        main = tr._main
        assert len(main[0]) == 10_000
        _fold(tr, [(5, "A", 1_000), (20_000, "A", 1_000)])  # one known, one new
        assert tr._main is main and len(tr._recent[0]) == 1 and len(tr) == 10_001
        tr.prune(0)  # merged: one table again, sorted
        assert len(tr._recent[0]) == 0 and tr._main[0][-1] == 20_000
        assert _fold(tr, [(20_000, "A", 2_000)]) == [(20_000, "A", 1_000, 2_000, 1)]

    @pytest.mark.parametrize("recent_most", [1, RECENT_MOST])
    def test_restore_puts_back_the_open_visits_as_saved(self, recent_most: int) -> None:
        """What a group whose transaction failed had folded is undone, both the visits
        it moved on (written in place) and the tags it added (new columns). With
        `recent_most` 1, a merge of the two tables comes between."""
        tr = VisitTracker(GAP, recent_most=recent_most)
        _fold(tr, [(1, "A", 0), (2, "A", 0), (5, "A", 0)])
        saved = tr.saved()
        _fold(tr, [(1, "B", 70_000), (3, "A", 70_000)])  # 1 moves on, 3 is new
        _fold(tr, [(2, "B", 80_000), (5, "A", 90_000)])  # in place on the new columns
        tr.restore(saved)
        assert len(tr) == 3
        # Each visit is still open as the first fold left it: reads at A continue it.
        again = _fold(tr, [(1, "A", 30_000), (2, "A", 30_000), (5, "A", 30_000),
                           (3, "A", 30_000)])
        assert again == [(1, "A", 0, 30_000, 1), (2, "A", 0, 30_000, 1),
                         (3, "A", 30_000, 30_000, 1), (5, "A", 0, 30_000, 1)]
