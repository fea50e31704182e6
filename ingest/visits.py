"""Folding reads into station visits, a whole group of batches at a time.

A visit is a tag's stay in range of one station (PROTOCOL.md section 3): it
ends when the tag is unheard there for `gap_ms`, by the reads' own times, or
is heard at another station. `VisitTracker.fold` sorts the group's reads by
(tag, time), cuts them into segments with array comparisons, and joins each
tag's first segment to the visit still open for that tag. The open visits are
sorted arrays, not a dict, so the join is one `searchsorted`; entries older
than the gap are pruned, and the table never holds more than `capacity` tags.

The table is two: the open visits of tags heard before the last merge, and those
of tags first heard since (`_recent`). A new tag goes into the small one, so a
group that brings one copies that one, not the whole town: with one table,
`np.insert` copied every open visit for every group with a new tag (24 bytes a
visit: 24 MB a group at a million open visits). The small one is merged into
the large one when the tracker is pruned (every 30 s, `Worker._maintain`), or
when it passes `RECENT_MOST`.

A segment older than the tag's open visit (a station that was cut off and
sends late) is marked `late`: the store folds it into the stored visit its
time falls in rather than into the open one. Older reads at the open visit's
own station, within its gap, join it instead, under its key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.batch import I8, I32, I64, U64, Bools

NO_RSSI = np.int16(-999)  # below any real dBm, so max() prefers a known value
# Open visits of new tags held apart before a merge: inserting into this many costs a
# group some 0.1 ms; a merge costs what one insert into the whole table did.
RECENT_MOST = 32_768

# Open visits sorted by tag: tag, station, first_ms (the visit's key), last_ms.
Table = tuple[U64, I32, I64, I64]


def _empty() -> Table:
    return (np.empty(0, np.uint64), np.empty(0, np.int32), np.empty(0, np.int64),
            np.empty(0, np.int64))


def _find(table: Table, tags: U64) -> tuple[I64, Bools]:
    """Where each of `tags` is in `table`, and whether it is there."""
    have = table[0]
    pos = np.searchsorted(have, tags)
    hit = np.zeros(len(tags), dtype=np.bool_)
    inside = pos < len(have)
    hit[inside] = have[pos[inside]] == tags[inside]
    return pos, hit


def _merged(into: Table, extra: Table) -> Table:
    at = np.searchsorted(into[0], extra[0])
    return (np.insert(into[0], at, extra[0]), np.insert(into[1], at, extra[1]),
            np.insert(into[2], at, extra[2]), np.insert(into[3], at, extra[3]))


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
    """The open visits' tables at `VisitTracker.saved`, and what was written over in
    them since."""

    main: Table
    recent: Table
    undo: list[tuple[np.ndarray, ...]]


class VisitTracker:
    """The open visits of every tag heard recently, as sorted columns."""

    def __init__(self, gap_ms: int, capacity: int = 2_000_000,
                 recent_most: int = RECENT_MOST) -> None:
        self.gap_ms = gap_ms
        self.capacity = capacity
        self.recent_most = recent_most
        self._main = _empty()    # tags heard before the last merge
        self._recent = _empty()  # tags first heard since (see the module docstring)
        self._names: list[str] = []           # station index -> id, shared across groups
        self._index: dict[str, int] = {}
        self._undo: list[tuple[np.ndarray, ...]] | None = None  # since `saved`, if called

    def __len__(self) -> int:
        return len(self._main[0]) + len(self._recent[0])

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
        known, open_station, open_first, open_last = self._open(seg_tag, tag_first)
        older = known & (first < open_last)
        # Older reads at the open visit's station, within its gap, are of that stay:
        # folded after newer ones (a station's batch written after its next, which
        # held a stolen tag: Worker._watch), they join it and keep its key. Others
        # are late: the store finds the stored visit they belong to.
        inside = older & (open_station == seg_station) & (last >= open_first - self.gap_ms)
        late = older & ~inside
        cont = known & ~older & (open_station == seg_station) & (
            first - open_last <= self.gap_ms)
        key_first = np.where(cont | inside, open_first, first)
        opens = ~cont & ~older

        prev_station = np.where(tag_first, open_station, np.roll(seg_station, 1))
        prev_first = np.where(tag_first, open_first, np.roll(key_first, 1))
        prev_last = np.where(tag_first, open_last, np.roll(last, 1))

        # The tag's newest segment becomes its open visit, unless it is late.
        upd = tag_last & ~(tag_first & late)
        ends = np.where(inside, np.maximum(last, open_last), last)
        self._remember(seg_tag[upd], seg_station[upd], key_first[upd], ends[upd])
        return Segments(seg_tag, seg_station.astype(np.int32), key_first.astype(np.int64),
                        last.astype(np.int64), reads.astype(np.int64), best, opens, late,
                        read_seg, prev_station.astype(np.int32), prev_first.astype(np.int64),
                        prev_last.astype(np.int64))

    def _open(self, tags: U64, wanted: Bools) -> tuple[Bools, I32, I64, I64]:
        """For each of `tags` where `wanted`: whether it has an open visit, and its
        station (-1 if none), first_ms and last_ms (0 if none)."""
        known = np.zeros(len(tags), dtype=np.bool_)
        station = np.full(len(tags), -1, dtype=np.int32)
        first = np.zeros(len(tags), dtype=np.int64)
        last = np.zeros(len(tags), dtype=np.int64)
        for table in (self._main, self._recent):
            if not len(table[0]):
                continue
            pos, hit = _find(table, tags)
            hit &= wanted
            at = pos[hit]
            known |= hit
            station[hit], first[hit], last[hit] = table[1][at], table[2][at], table[3][at]
        return known, station, first, last

    def _remember(self, tag: U64, station: I32, first: I64, last: I64) -> None:
        new = np.ones(len(tag), dtype=np.bool_)
        for table in (self._main, self._recent):
            if not len(table[0]):
                continue
            pos, hit = _find(table, tag)
            at = pos[hit]
            _, stations, firsts, lasts = table
            if self._undo is not None:  # in place, so what these rows held is kept (`saved`)
                self._undo.append((stations, firsts, lasts, at, stations[at], firsts[at],
                                   lasts[at]))
            stations[at], firsts[at], lasts[at] = station[hit], first[hit], last[hit]
            new &= ~hit
        if new.any():  # new arrays: the ones `saved` handed out keep their rows
            self._recent = _merged(self._recent, (tag[new], station[new], first[new],
                                                  last[new]))
            if len(self._recent[0]) > self.recent_most:
                self._merge()
        if len(self) > self.capacity:
            self._merge()
            ends = self._main[3]
            self.prune(int(np.partition(ends, len(ends) - self.capacity)
                           [len(ends) - self.capacity]) + self.gap_ms)

    def _merge(self) -> None:
        if len(self._recent[0]):
            self._main, self._recent = _merged(self._main, self._recent), _empty()

    def saved(self) -> Saved:
        """The open visits as they are, for `restore` to put back (a group whose
        transaction failed). Folds since write in place and note what they overwrote,
        only since the last call: copying the columns instead cost every group
        0.6 ms at 64,000 open visits, growing with the town."""
        self._undo = []
        return Saved(self._main, self._recent, self._undo)

    def restore(self, saved: Saved) -> None:
        for station, first, last, at, was_station, was_first, was_last in reversed(saved.undo):
            station[at], first[at], last[at] = was_station, was_first, was_last
        saved.undo.clear()
        self._main, self._recent = saved.main, saved.recent

    def prune(self, now_ms: int) -> None:
        """Forget visits that ended (unheard for the gap) by `now_ms`, in reads' time; the
        tags first heard since the last prune join the others."""
        self._merge()
        keep = self._main[3] >= now_ms - self.gap_ms
        if not keep.all():
            tag, station, first, last = self._main
            self._main = (tag[keep], station[keep], first[keep], last[keep])
