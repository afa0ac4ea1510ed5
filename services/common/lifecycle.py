"""Process lifecycle shared by every service: readiness file, stop signals, HTTP sites on port 0."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

log = logging.getLogger(__name__)
T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T], *, uvloop: bool = False) -> T:
    """``asyncio.run(main)``; with ``uvloop``, on uvloop's event loop (aiohttp's recommended one, which
    takes about a quarter off each webhook's CPU: ``bench/webhook_load.py``) where it is installed."""
    factory = None
    if uvloop:
        try:
            import uvloop as uv
        except ImportError:  # not on every platform: the standard loop does the same work, slower
            log.info("uvloop is not installed: running on the standard asyncio loop")
        else:
            factory = uv.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def freeze_startup_heap() -> int:
    """Move every object alive once the service has started (modules, models, clients) out of the
    garbage collector's walk, and return how many there are. A full collection then walks only what
    was made since: under the webhook benchmark's load, ingest's full collections took 32 ms each
    and stalled every webhook in flight; they now take about 3 ms. Call it once, when start-up is
    done. Objects frozen are still freed when their last reference goes, but a cycle among them
    is never collected; start-up builds what the service keeps, so that costs nothing."""
    gc.collect()  # start-up's own garbage goes first, so it is not kept for good
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("start-up heap frozen: %d objects", frozen)
    return frozen


def write_ready_file(path: Path | None, address: str, **extra: str) -> None:
    """Tell whoever started us (``CALLMESH_READY_FILE``) the address we are serving on (and e.g. ``metrics``)."""
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"address": address, **extra}))
        tmp.replace(path)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


IDLE_CONNECTION_SECONDS = 75.0  # how long a site keeps a connection that has no request in progress


async def start_site(app: web.Application, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                     **runner_options: object) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port``; return the runner and the bound port (port 0 picks a free one).
    A connection with no request in progress, or one that never sends a whole request head, is closed after
    ``keepalive_timeout`` (:data:`IDLE_CONNECTION_SECONDS` unless given: aiohttp's own default is an hour, so
    silent clients could otherwise hold connections for good); a request being answered is never cut off."""
    runner_options.setdefault("keepalive_timeout", IDLE_CONNECTION_SECONDS)
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]
