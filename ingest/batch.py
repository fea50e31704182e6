"""The one internal shape of reads: a columnar batch of numpy arrays (DESIGN.md, decision 1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
I8 = npt.NDArray[np.int8]
U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
Bools = npt.NDArray[np.bool_]

#: Flag bits of a read (PROTOCOL.md 2.1).
FLAG_LOW_BATTERY = 1
FLAG_TAMPER = 2
FLAG_MOTION = 4


@dataclass(slots=True, frozen=True)
class Reads:
    """Reads as columns: one batch's, or a whole group's that its batches are spans of."""

    tag: U64
    ts_ms: I64
    rssi: I8
    ant: U8
    flags: U16

    def __post_init__(self) -> None:
        n = len(self.tag)
        if not (len(self.ts_ms) == len(self.rssi) == len(self.ant) == len(self.flags) == n):
            raise ValueError("Reads columns differ in length")

    def __len__(self) -> int:
        return len(self.tag)

    def span(self, start: int, stop: int) -> Reads:
        if start == 0 and stop == len(self):
            return self
        return Reads(self.tag[start:stop], self.ts_ms[start:stop], self.rssi[start:stop],
                     self.ant[start:stop], self.flags[start:stop])


NO_READS = Reads(np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.int8),
                 np.empty(0, np.uint8), np.empty(0, np.uint16))


def gather(batches: Sequence[ReadBatch]) -> Reads:
    """The reads of `batches`, in order, as one set of columns.

    Batches decoded together are adjacent spans of the same columns: a group with
    no batch dropped between them is one run, returned without a copy. Slicing
    every batch out of the group's arrays and concatenating them again cost
    several microseconds a batch, a share of the whole hot path at full load."""
    runs: list[tuple[Reads, int, int]] = []
    for b in batches:
        cols, start, stop = b.columns, b.start, b.stop
        if runs and runs[-1][0] is cols and runs[-1][2] == start:
            runs[-1] = (cols, runs[-1][1], stop)
        else:
            runs.append((cols, start, stop))
    if len(runs) == 1:
        cols, start, stop = runs[0]
        return cols.span(start, stop)
    parts = [cols.span(start, stop) for cols, start, stop in runs] or [NO_READS]
    return Reads(np.concatenate([p.tag for p in parts]), np.concatenate([p.ts_ms for p in parts]),
                 np.concatenate([p.rssi for p in parts]), np.concatenate([p.ant for p in parts]),
                 np.concatenate([p.flags for p in parts]))


@dataclass(slots=True)
class ReadBatch:
    """One station's batch after decoding: the envelope, and its reads as the span
    [start, stop) of columns it may share with the batches decoded with it.

    Not frozen, though nothing changes it after decoding: one is made a message, and
    a frozen dataclass's `__init__` (one `object.__setattr__` a field) cost 1.3 µs
    against 0.3.

    `rssi` is 0 where unknown (no real radio reports 0 dBm). `bad_tag` and
    `bad_value` count the reads dropped alone while decoding, `skewed` the reads
    whose time was replaced by the receive time (PROTOCOL.md 2.5).
    """

    station: str
    boot: int
    seq: int
    sent_ms: int
    columns: Reads
    start: int
    stop: int
    bad_tag: int = 0
    bad_value: int = 0
    skewed: int = 0
    binary: bool = field(default=False, compare=False)

    @classmethod
    def of(cls, station: str, boot: int, seq: int, sent_ms: int, reads: Reads, *,
           bad_tag: int = 0, bad_value: int = 0, skewed: int = 0) -> ReadBatch:
        """A batch with columns of its own."""
        return cls(station, boot, seq, sent_ms, reads, 0, len(reads), bad_tag, bad_value,
                   skewed)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def reads(self) -> Reads:
        """Its own reads (a view: the hot path gathers the group's at once instead)."""
        return self.columns.span(self.start, self.stop)

    @property
    def key(self) -> tuple[str, int, int]:
        """The dedupe key of PROTOCOL.md 2.4."""
        return (self.station, self.boot, self.seq)
