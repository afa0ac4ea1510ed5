"""Load on loopback, bounded: 2,000 signed webhooks offered over 60 s, every one acknowledged and queued.

The other services are down on purpose (the calls wait in the durable queue, as
they would during an outage); ingest is a real process. The webhooks are sent on
a fixed schedule (one every 30 ms, up to 64 in flight), so the test offers a
known load rather than timing the service: what it checks is that nothing is
refused or lost, and that the queue survives a restart. The throughput ceiling
is measured in bench/webhook_load.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp

from callmesh.mesh import new_mesh
from callmesh.standins import post_webhook

WEBHOOKS = 2000
SPACING = 0.03  # seconds between webhooks: 2,000 in 60 s
IN_FLIGHT = 64


async def all_calls(session: aiohttp.ClientSession, ingest_url: str) -> list[str]:
    ids: list[str] = []
    for offset in range(0, WEBHOOKS + 500, 500):
        async with session.get(f"{ingest_url}/v1/calls", params={"limit": "500", "offset": str(offset)}) as resp:
            ids += [c["call_id"] for c in (await resp.json())["calls"]]
    return ids


async def test_two_thousand_signed_webhooks_are_all_acknowledged_and_queued(tmp_path: Path) -> None:
    mesh = new_mesh({"INGEST_PORT": "0", "CALLMESH_DATA_DIR": str(tmp_path / "data"),
                     "RECORDING_ALLOWED_HOSTS": "127.0.0.1", "RECORDING_ALLOWED_NETWORKS": "127.0.0.0/8",
                     "TRANSCRIBE_ADDR": "127.0.0.1:9", "ANALYZE_ADDR": "127.0.0.1:9", "CRM_SYNC_ADDR": "127.0.0.1:9",
                     "PIPELINE_CONCURRENCY": "1", "PIPELINE_BACKOFF_INITIAL_SECONDS": "30"}, tmp_path)
    mesh.start_service("ingest", timeout=60)
    try:
        gate = asyncio.Semaphore(IN_FLIGHT)
        codes: Counter[int] = Counter()
        latencies: list[float] = []
        start = time.monotonic()

        async def send(session: aiohttp.ClientSession, i: int) -> None:
            await asyncio.sleep(max(0.0, start + i * SPACING - time.monotonic()))
            payload = {"call_id": f"load-{i:04d}", "recording_url": f"http://127.0.0.1:9/recordings/{i}.wav"}
            async with gate:
                t0 = time.monotonic()
                code, _ = await asyncio.wait_for(post_webhook(session, mesh.ingest_url, payload, mesh.webhook_secret),
                                                 timeout=30)
                latencies.append(time.monotonic() - t0)
            codes[code] += 1

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT)) as session:
            await asyncio.wait_for(asyncio.gather(*(send(session, i) for i in range(WEBHOOKS))), timeout=180)
            elapsed = time.monotonic() - start
            latencies.sort()
            print(f"{WEBHOOKS} webhooks in {elapsed:.1f} s; latency p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
                  f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms")
            assert codes == {202: WEBHOOKS}
            assert sorted(await all_calls(session, mesh.ingest_url)) == [f"load-{i:04d}" for i in range(WEBHOOKS)]
            await asyncio.to_thread(mesh.restart_service, "ingest")  # SIGTERM, drain, start again
            assert len(set(await all_calls(session, mesh.ingest_url))) == WEBHOOKS
    finally:
        mesh.stop()
