"""The stolen snapshot's membership test agrees with a Python set, whatever the tags."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from registry.snapshot import StolenSet

tags64 = st.integers(0, 2**64 - 1)


class TestMatch:
    @given(st.sets(tags64, max_size=200), st.lists(tags64, max_size=300), st.data())
    def test_matches_exactly_the_stolen_tags(self, stolen: set[int], reads: list[int],
                                             data: st.DataObject) -> None:
        if stolen:  # make sure some reads hit
            reads += data.draw(st.lists(st.sampled_from(sorted(stolen)), max_size=20))
        snap = StolenSet.build(1, [(t, i, f"C{i}") for i, t in enumerate(sorted(stolen))])
        idx, entry = snap.match(np.array(reads, dtype=np.uint64))
        assert idx.tolist() == [i for i, t in enumerate(reads) if t in stolen]
        assert [snap.case_ids[e] for e in entry.tolist()] == [
            f"C{sorted(stolen).index(reads[i])}" for i in idx.tolist()]

    def test_empty_snapshot_matches_nothing(self) -> None:
        idx, _ = StolenSet.empty().match(np.arange(10, dtype=np.uint64))
        assert len(idx) == 0

    def test_sequential_tags_are_spread_by_the_hash(self) -> None:
        stolen = np.arange(0xA10000, 0xA10000 + 5000, dtype=np.uint64)
        snap = StolenSet.build(1, [(int(t), 0, "c") for t in stolen])
        innocent = np.arange(0xB10000, 0xB10000 + 100_000, dtype=np.uint64)
        assert len(snap.match(innocent)[0]) == 0
        assert len(snap.match(stolen)[0]) == 5000
