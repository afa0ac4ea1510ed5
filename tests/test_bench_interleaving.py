"""Benchmark arms take turns (A B C A B C …), so a slow spell of the machine falls on every arm alike."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from bench.common import interleaved, interleaved_all


def recording(name: str, order: list[str]) -> Callable[[], Awaitable[float]]:
    async def arm() -> float:
        order.append(name)
        return float(len(order))
    return arm


def test_three_arms_run_in_turn_and_keep_their_own_measurements() -> None:
    order: list[str] = []
    measured = asyncio.run(interleaved_all([recording(name, order) for name in "abc"], runs=3))

    assert order == list("abcabcabc")
    assert measured == [[1.0, 4.0, 7.0], [2.0, 5.0, 8.0], [3.0, 6.0, 9.0]]


def test_two_arms_alternate() -> None:
    order: list[str] = []
    first, second = asyncio.run(interleaved(recording("a", order), recording("b", order), runs=2))

    assert order == list("abab")
    assert (first, second) == ([1.0, 3.0], [2.0, 4.0])
