"""A group's reads gathered from the batches that survive dedupe: the same reads, in
order, whichever batches were dropped, and no copy when none was."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ingest.batch import gather
from ingest.codec import decode_many, encode_binary, encode_json

NOW = 1_763_803_800_000


def _payloads(sizes: list[int], json_every: int) -> list[tuple[bytes, str, int]]:
    out = []
    for seq, n in enumerate(sizes):
        tags = [seq * 1000 + i + 1 for i in range(n)]
        if json_every and seq % json_every == 0:
            out.append((encode_json(1, seq, NOW, tags, [NOW - i for i in range(n)],
                                    rssi=[-50] * n, flags=[seq & 7] * n), "S1", NOW))
        else:
            out.append((encode_binary(1, seq, NOW, tags, list(range(n)), rssi=[-50] * n,
                                      flags=[seq & 7] * n), "S1", NOW))
    return out


@given(st.lists(st.integers(0, 20), min_size=1, max_size=30), st.integers(0, 4),
       st.data())
def test_gathered_reads_are_the_kept_batches_reads_in_order(
        sizes: list[int], json_every: int, data: st.DataObject) -> None:
    batches = [b for b in decode_many(_payloads(sizes, json_every)) if not isinstance(b, Exception)]
    kept = [b for b in batches if data.draw(st.booleans())]
    reads = gather(kept)
    for column in ("tag", "ts_ms", "rssi", "ant", "flags"):
        expected = [v for b in kept for v in getattr(b.reads, column).tolist()]
        assert getattr(reads, column).tolist() == expected, column
    assert len(reads) == sum(len(b) for b in kept)


def test_a_whole_binary_group_is_gathered_without_a_copy() -> None:
    batches = decode_many(_payloads([50] * 20, json_every=0))
    whole = gather(batches)  # type: ignore[arg-type]
    assert np.shares_memory(whole.tag, batches[0].columns.tag)  # type: ignore[union-attr]
    assert len(whole) == 1000
    assert whole.tag.flags.writeable  # a copy out of the read-only payload buffer
