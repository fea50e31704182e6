"""Folding reads into station visits, a whole group of batches at a time.

A visit is a tag's stay in range of one station (PROTOCOL.md section 3): it
ends when the tag is unheard there for `gap_ms`, by the reads' own times, or
is heard at another station. `VisitTracker.fold` sorts the group's reads by
(tag, time), cuts them into segments with array comparisons, and joins each
tag's first segment to the visit still open for that tag. The open visits are
sorted arrays, not a dict, so the join is one `searchsorted`; entries older
than the gap are pruned, and the table never holds more than `capacity` tags.

A segment older than the tag's open visit (a station that was cut off and
sends late) is marked `late`: the store folds it into the stored visit its
time falls in rather than into the open one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.batch import I8, I32, I64, U64, Bools

NO_RSSI = np.int16(-999)  # below any real dBm, so max() prefers a known value


@dataclass(slots=True, frozen=True)
class Segments:
    """One row per visit fragment of the group, ready to upsert.

    `first_ms` is the visit's key: the open visit's start where the segment
    continues it. `opens` marks segments that start a new visit, `late` those
    that belong before the open visit. `read_seg` maps each read (in the
    group's original order) to its segment.
    """

    tag: U64
    station: I32
    first_ms: I64
    last_ms: I64
    reads: I64
    best_rssi: np.ndarray[tuple[int], np.dtype[np.int16]]
    opens: Bools
    late: Bools
    read_seg: I64
    # The tag's visit before this segment (the previous segment of the group, else the
    # tag's open visit): its station (-1 if none known), start and end. For impossible
    # travel.
    prev_station: I32
    prev_first: I64
    prev_last: I64

    def __len__(self) -> int:
        return len(self.tag)


@dataclass(slots=True, frozen=True)
class Saved:
    """The open visits' columns at `VisitTracker.saved`, and what was written over in
    them since."""

    tag: U64
    station: I32
    first: I64
    last: I64
    undo: list[tuple[np.ndarray, ...]]


class VisitTracker:
    """The open visits of every tag heard recently, as sorted columns."""

    def __init__(self, gap_ms: int, capacity: int = 2_000_000) -> None:
        self.gap_ms = gap_ms
        self.capacity = capacity
        self._tag: U64 = np.empty(0, np.uint64)
        self._station: I32 = np.empty(0, np.int32)
        self._first: I64 = np.empty(0, np.int64)
        self._last: I64 = np.empty(0, np.int64)
        self._names: list[str] = []           # station index -> id, shared across groups
        self._index: dict[str, int] = {}
        self._undo: list[tuple[np.ndarray, ...]] | None = None  # since `saved`, if called

    def __len__(self) -> int:
        return len(self._tag)

    def station_index(self, station: str) -> int:
        idx = self._index.get(station)
        if idx is None:
            idx = self._index[station] = len(self._names)
            self._names.append(station)
        return idx

    def station_name(self, idx: int) -> str:
        return self._names[idx]

    def station_names(self) -> list[str]:
        return self._names

    def fold(self, tag: U64, station: I32, ts: I64, rssi: I8) -> Segments:
        n = len(tag)
        order = np.lexsort((ts, tag))
        t, s, ms = tag[order], station[order], ts[order]
        r = rssi[order].astype(np.int16)
        r[r == 0] = NO_RSSI
        cut = np.ones(n, dtype=np.bool_)
        cut[1:] = (t[1:] != t[:-1]) | (s[1:] != s[:-1]) | (ms[1:] - ms[:-1] > self.gap_ms)
        start = np.flatnonzero(cut)
        seg_tag, seg_station, first = t[start], s[start], ms[start]
        last = np.maximum.reduceat(ms, start) if n else ms
        reads = np.diff(np.append(start, n))
        best = np.maximum.reduceat(r, start) if n else r
        read_seg = np.empty(n, dtype=np.int64)
        read_seg[order] = np.cumsum(cut) - 1

        k = len(start)
        tag_first = np.ones(k, dtype=np.bool_)
        tag_first[1:] = seg_tag[1:] != seg_tag[:-1]
        tag_last = np.ones(k, dtype=np.bool_)
        tag_last[:-1] = tag_first[1:]

        # Join each tag's first segment to its open visit.
        pos = np.searchsorted(self._tag, seg_tag)
        pos[pos == len(self._tag)] = 0
        known = tag_first & (len(self._tag) > 0)
        if len(self._tag):
            known &= self._tag[pos] == seg_tag
        open_last = np.where(known, self._last[pos] if len(self._tag) else 0, 0)
        open_first = np.where(known, self._first[pos] if len(self._tag) else 0, 0)
        open_station = np.where(known, self._station[pos] if len(self._tag) else -1, -1)
        late = known & (first < open_last)
        cont = known & ~late & (open_station == seg_station) & (first - open_last <= self.gap_ms)
        key_first = np.where(cont, open_first, first)
        opens = ~cont & ~late

        prev_station = np.where(tag_first, open_station, np.roll(seg_station, 1))
        prev_first = np.where(tag_first, open_first, np.roll(key_first, 1))
        prev_last = np.where(tag_first, open_last, np.roll(last, 1))

        # The tag's newest segment becomes its open visit, unless it is late.
        upd = tag_last & ~(tag_first & late)
        self._remember(seg_tag[upd], seg_station[upd], key_first[upd], last[upd])
        return Segments(seg_tag, seg_station.astype(np.int32), key_first.astype(np.int64),
                        last.astype(np.int64), reads.astype(np.int64), best, opens, late,
                        read_seg, prev_station.astype(np.int32), prev_first.astype(np.int64),
                        prev_last.astype(np.int64))

    def _remember(self, tag: U64, station: I32, first: I64, last: I64) -> None:
        pos = np.searchsorted(self._tag, tag)
        inside = pos < len(self._tag)
        hit = np.zeros(len(tag), dtype=np.bool_)
        hit[inside] = self._tag[pos[inside]] == tag[inside]
        hp = pos[hit]
        if self._undo is not None:  # in place, so what these rows held is kept (`saved`)
            self._undo.append((self._station, self._first, self._last, hp,
                               self._station[hp], self._first[hp], self._last[hp]))
        self._station[hp], self._first[hp], self._last[hp] = station[hit], first[hit], last[hit]
        new = ~hit
        if new.any():  # new arrays: the ones `saved` handed out keep their rows
            at = pos[new]
            self._tag = np.insert(self._tag, at, tag[new])
            self._station = np.insert(self._station, at, station[new])
            self._first = np.insert(self._first, at, first[new])
            self._last = np.insert(self._last, at, last[new])
        if len(self._tag) > self.capacity:
            self.prune(int(np.partition(self._last, len(self._last) - self.capacity)
                           [len(self._last) - self.capacity]) + self.gap_ms)

    def saved(self) -> Saved:
        """The open visits as they are, for `restore` to put back (a group whose
        transaction failed). Folds since write in place and note what they overwrote,
        only since the last call: copying the columns instead cost every group
        0.6 ms at 64,000 open visits, growing with the town."""
        self._undo = []
        return Saved(self._tag, self._station, self._first, self._last, self._undo)

    def restore(self, saved: Saved) -> None:
        for station, first, last, at, was_station, was_first, was_last in reversed(saved.undo):
            station[at], first[at], last[at] = was_station, was_first, was_last
        saved.undo.clear()
        self._tag, self._station, self._first, self._last = (
            saved.tag, saved.station, saved.first, saved.last)

    def prune(self, now_ms: int) -> None:
        """Forget visits that ended (unheard for the gap) by `now_ms`, in reads' time."""
        keep = self._last >= now_ms - self.gap_ms
        if not keep.all():
            self._tag, self._station = self._tag[keep], self._station[keep]
            self._first, self._last = self._first[keep], self._last[keep]
