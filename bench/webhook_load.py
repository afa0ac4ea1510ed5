"""Webhook intake throughput: signed webhooks into ingest's durable queue, against a bare HTTP baseline.

    .venv/bin/python -m bench.webhook_load [--webhooks 2000] [--in-flight 64]

Both servers are separate processes on 127.0.0.1. The baseline is an aiohttp
handler that reads the body and answers 202 (no signature check, no validation,
no fsync); ingest verifies the Standard Webhooks signature, validates, and
commits each call to SQLite (WAL, synchronous=FULL) before it answers. The
other services are down, so the calls stay queued. Prints webhooks/s, latency
percentiles and the ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from callmesh.mesh import new_mesh
from callmesh.standins import post_webhook


async def _baseline_handler(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"status": "received"}, status=202)


def serve_baseline(ready: Path) -> None:
    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/calls", _baseline_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.write_text(json.dumps({"address": f"127.0.0.1:{port}"}))
        await asyncio.Event().wait()

    asyncio.run(main())


async def blast(url: str, secret: str | None, n: int, in_flight: int, prefix: str) -> tuple[float, list[float]]:
    gate = asyncio.Semaphore(in_flight)
    latencies: list[float] = []

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        payload = {"call_id": f"{prefix}-{i:05d}", "recording_url": f"http://127.0.0.1:9/r/{i}.wav"}
        async with gate:
            t0 = time.perf_counter()
            code, body = await post_webhook(session, url, payload, secret)
            latencies.append(time.perf_counter() - t0)
        if code != 202:
            raise RuntimeError(f"HTTP {code}: {body}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(one(session, i) for i in range(n)))
        return time.perf_counter() - start, sorted(latencies)


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))] * 1000


async def run(n: int, in_flight: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    ready = work / "baseline.ready"
    baseline = subprocess.Popen([sys.executable, "-m", "bench.webhook_load", "--serve-baseline", str(ready)])
    mesh = new_mesh({"INGEST_PORT": "0", "CALLMESH_DATA_DIR": str(work / "data"), "LOG_LEVEL": "WARNING",
                     "RECORDING_ALLOWED_HOSTS": "127.0.0.1", "RECORDING_ALLOWED_NETWORKS": "127.0.0.0/8",
                     "TRANSCRIBE_ADDR": "127.0.0.1:9", "ANALYZE_ADDR": "127.0.0.1:9", "CRM_SYNC_ADDR": "127.0.0.1:9",
                     "PIPELINE_CONCURRENCY": "1", "PIPELINE_BACKOFF_INITIAL_SECONDS": "60"}, work)
    try:
        mesh.start_service("ingest", timeout=60)
        while not ready.exists():
            time.sleep(0.05)
        base_url = "http://" + json.loads(ready.read_text())["address"]
        await blast(base_url, None, 200, in_flight, "warm")  # warm both up
        await blast(mesh.ingest_url, mesh.webhook_secret, 200, in_flight, "warm")
        b_time, b_lat = await blast(base_url, None, n, in_flight, "base")
        i_time, i_lat = await blast(mesh.ingest_url, mesh.webhook_secret, n, in_flight, "load")
    finally:
        mesh.stop()
        baseline.terminate()
        baseline.wait()
    rows = [("baseline (bare aiohttp 202)", b_time, b_lat), ("ingest (signed, validated, fsynced)", i_time, i_lat)]
    print(f"{n} webhooks, {in_flight} in flight, 127.0.0.1")
    print(f"{'server':38} {'webhooks/s':>11} {'p50 ms':>8} {'p99 ms':>8}")
    for name, t, lat in rows:
        print(f"{name:38} {n / t:11.0f} {pct(lat, 0.5):8.1f} {pct(lat, 0.99):8.1f}")
    print(f"ratio ingest/baseline throughput: {b_time / i_time:.2f}; "
          f"2,000 webhooks take {2000 * i_time / n:.1f} s at this rate (goal: within 60 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webhooks", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--serve-baseline", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return
    asyncio.run(run(args.webhooks, args.in_flight))


if __name__ == "__main__":
    main()
