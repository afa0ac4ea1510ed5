"""Retry timing shared by the ingest worker and the CRM delivery worker."""

from __future__ import annotations

import asyncio
import random

_rng = random.Random()


def backoff_delay(attempts: int, initial: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: uniform in [c/2, c], c = min(cap, initial * 2**attempts).

    ``attempts`` is how many tries already failed before this one, minus one (0 after the first failure).
    """
    ceiling = min(cap, initial * (2 ** max(0, attempts)))
    return (rng or _rng).uniform(ceiling / 2, ceiling)


async def sleep_or_wake(event: asyncio.Event, timeout: float) -> None:
    """Sleep up to ``timeout`` seconds, less when ``event`` is set; clear it for the next round.

    Cleared after waking, not before working: a wake-up that arrives while the
    caller works stays set, and the next sleep returns at once.
    """
    try:
        await asyncio.wait_for(event.wait(), timeout=timeout)
    except asyncio.TimeoutError:
        pass
    event.clear()
