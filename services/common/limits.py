"""Admission control: a bounded number of running jobs plus a bounded queue.

A service takes work while it has room and pushes back (gRPC
RESOURCE_EXHAUSTED) instead of piling up work until it runs out of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator

# A write that fails with one of these found no room on its disk (full, over a quota, or past the file size the
# process may write): the work waits for room rather than fail for good.
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

# Initial metadata a service sends once it has admitted a stream (callcenter.v1.TranscriptionConfig.await_admission).
ADMITTED_METADATA = "callmesh-admitted"


class Overloaded(Exception):
    """Every running slot and every queue place is taken."""


class AdmissionLimiter:
    """At most ``max_running`` holders at once, and at most ``max_queued`` waiting."""

    def __init__(self, max_running: int, max_queued: int) -> None:
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.max_running = max_running
        self.max_queued = max_queued
        self._semaphore = asyncio.Semaphore(max_running)
        self.admitted = 0
        self.running = 0

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_queued

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator["AdmissionLimiter"]:
        """Take a place (queued or running) or raise :class:`Overloaded` at once."""
        if self.admitted >= self.capacity:
            raise Overloaded(
                f"busy: {self.running} running and {self.admitted - self.running} queued "
                f"(limits {self.max_running} + {self.max_queued}); retry later"
            )
        self.admitted += 1
        try:
            yield self
        finally:
            self.admitted -= 1

    @contextlib.asynccontextmanager
    async def run_slot(self) -> AsyncIterator[None]:
        """Wait for a running slot; use inside :meth:`admit`."""
        async with self._semaphore:
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1
