"""What every service does once started: its start-up heap leaves the garbage collector's walk, and its HTTP
ports (ingest's API, the others' /metrics) let go of connections that sit idle."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web

from services.common import lifecycle
from services.common.lifecycle import freeze_startup_heap, start_site
from services.common.metrics import start_metrics_site


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """Let the test freeze this process's heap, and give it back to the collector afterwards."""
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()


def test_objects_alive_at_start_are_left_out_of_later_collections(frozen_heap: None) -> None:
    startup = [[i] for i in range(1000)]
    frozen = freeze_startup_heap()
    after = [[i] for i in range(10)]
    tracked = {id(o) for o in gc.get_objects()}
    assert frozen >= len(startup)
    assert not any(id(o) in tracked for o in startup)
    assert all(id(o) in tracked for o in after)


def test_garbage_left_by_start_up_is_freed_not_frozen(frozen_heap: None) -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    gone = weakref.ref(a)
    del a, b
    freeze_startup_heap()
    assert gone() is None


async def test_a_metrics_port_closes_a_connection_that_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "IDLE_CONNECTION_SECONDS", 0.5)
    runner, address = await start_metrics_site("127.0.0.1:0")
    try:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the site, not by this test's wait
        finally:
            writer.close()
    finally:
        await runner.cleanup()


async def test_an_answer_slower_than_the_idle_limit_is_not_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "IDLE_CONNECTION_SECONDS", 0.3)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/slow", slow)
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/slow") as resp:
            assert (resp.status, await resp.text()) == (200, "done")
    finally:
        await runner.cleanup()
