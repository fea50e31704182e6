"""The one internal shape of reads: a columnar batch of numpy arrays (DESIGN.md, decision 1)."""

from __future__ import annotations

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
class ReadBatch:
    """One station's batch after decoding: the envelope and one column per field.

    `rssi` is 0 where unknown (no real radio reports 0 dBm). `bad_tag` and
    `bad_value` count the reads dropped alone while decoding, `skewed` the reads
    whose time was replaced by the receive time (PROTOCOL.md 2.5).
    """

    station: str
    boot: int
    seq: int
    sent_ms: int
    tag: U64
    ts_ms: I64
    rssi: I8
    ant: U8
    flags: U16
    bad_tag: int = 0
    bad_value: int = 0
    skewed: int = 0
    binary: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.tag)
        if not (len(self.ts_ms) == len(self.rssi) == len(self.ant) == len(self.flags) == n):
            raise ValueError("ReadBatch columns differ in length")

    def __len__(self) -> int:
        return len(self.tag)

    @property
    def key(self) -> tuple[str, int, int]:
        """The dedupe key of PROTOCOL.md 2.4."""
        return (self.station, self.boot, self.seq)
