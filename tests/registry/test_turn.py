"""The write turn (registry.db.Turn): first come, first served, but for `first()`."""

from __future__ import annotations

import asyncio

from registry.db import Turn


async def _queue(turn: Turn, order: list[str], name: str, first: bool = False) -> None:
    async with turn.first() if first else turn:
        order.append(name)
        await asyncio.sleep(0)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_in_the_order_they_came_but_first_goes_ahead_of_those_waiting() -> None:
    turn, order = Turn(), list[str]()
    await turn.acquire()
    waiting = [asyncio.create_task(_queue(turn, order, n)) for n in ("a", "b")]
    await _settle()
    waiting.append(asyncio.create_task(_queue(turn, order, "sighting", first=True)))
    waiting.append(asyncio.create_task(_queue(turn, order, "c")))
    await _settle()
    assert order == [] and turn.locked()
    turn.release()
    await asyncio.gather(*waiting)
    assert order == ["sighting", "a", "b", "c"]
    assert not turn.locked()


async def test_one_holder_at_a_time() -> None:
    turn, inside, most = Turn(), [0], [0]

    async def hold(first: bool) -> None:
        async with turn.first() if first else turn:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            await asyncio.sleep(0.001)
            inside[0] -= 1

    await asyncio.gather(*(hold(i % 3 == 0) for i in range(30)))
    assert most[0] == 1 and not turn.locked()


async def test_a_waiter_cancelled_leaves_the_line_and_one_handed_the_turn_passes_it_on(
        ) -> None:
    turn, order = Turn(), list[str]()
    await turn.acquire()
    gone = asyncio.create_task(_queue(turn, order, "gone"))
    handed = asyncio.create_task(_queue(turn, order, "handed"))
    last = asyncio.create_task(_queue(turn, order, "last"))
    await _settle()
    gone.cancel()  # still waiting: it leaves the line
    await _settle()
    turn.release()  # hands the turn to "handed"...
    handed.cancel()  # ...cancelled before it ran: the turn goes on to "last"
    await asyncio.wait_for(asyncio.gather(gone, handed, last, return_exceptions=True), 5)
    assert order == ["last"] and not turn.locked()
