"""Scale-out on PostgreSQL: two ingest replicas and two CRM replicas share one database.

The mesh runs as separate processes on the real models, with ``DATABASE_URL``
pointing both ingest replicas and both CRM replicas at one PostgreSQL server on
loopback. Ingest reaches the CRM replicas through one gRPC target that lists
both (``round_robin``, as a headless Kubernetes Service gives). Each of the 40
webhooks is posted to both ingest replicas at once; one ingest replica and one
CRM replica are SIGKILLed while calls are in flight and stay dead. What must
hold: every call done, each in the CRM exactly once, each with one key.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from callmesh.mesh import new_mesh
from callmesh.standins import CrmReceiver, Recorder, post_webhook
from tests.postgres_server import PostgresServer
from tests.test_chaos import statuses

CALLS = 40
DEADLINE_SECONDS = 1500  # 40 calls on two cores take about 700 s; the suite's 900 s per test is too tight
pytestmark = [pytest.mark.models, pytest.mark.timeout(DEADLINE_SECONDS + 300)]
RECORDINGS = ("en-internet-angry.wav", "es-billing-angry-8k.mp3")


async def test_two_ingest_and_two_crm_replicas_process_each_call_once_while_one_of_each_dies(
        audio_dir: Path, whisper_dir: Path, llm_small: Path, postgres: PostgresServer, tmp_path: Path) -> None:
    recorder = await Recorder(audio_dir).start()
    crm = await CrmReceiver().start()
    mesh = new_mesh({
        "DATABASE_URL": postgres.new_database(), "CRM_URL": crm.url,
        "WHISPER_MODEL": str(whisper_dir), "LLM_MODEL": str(llm_small),
        "RECORDING_ALLOWED_HOSTS": "127.0.0.1", "RECORDING_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PIPELINE_CONCURRENCY": "2", "PIPELINE_LEASE_SECONDS": "8",
        "PIPELINE_BACKOFF_INITIAL_SECONDS": "0.2", "PIPELINE_BACKOFF_MAX_SECONDS": "2",
        "CRM_TIMEOUT_SECONDS": "3", "CRM_LEASE_SECONDS": "5",
        "CRM_BACKOFF_INITIAL_SECONDS": "0.2", "CRM_BACKOFF_MAX_SECONDS": "2", "DELIVERY_POLL_SECONDS": "0.5",
        "TRANSCRIBE_LISTEN": "127.0.0.1:0", "ANALYZE_LISTEN": "127.0.0.1:0", "CRM_SYNC_LISTEN": "127.0.0.1:0",
        "TRANSCRIBE_METRICS_LISTEN": "127.0.0.1:0", "ANALYZE_METRICS_LISTEN": "127.0.0.1:0",
        "CRM_SYNC_METRICS_LISTEN": "127.0.0.1:0", "INGEST_PORT": "0",
    }, tmp_path)
    try:
        for name in ("transcribe", "analyze"):
            await asyncio.to_thread(mesh.start_service, name)
        crms = [await asyncio.to_thread(mesh.start_service, f"crm-{r}", module="crm") for r in "ab"]
        mesh.env.update(TRANSCRIBE_ADDR=mesh.services["transcribe"].address,
                        ANALYZE_ADDR=mesh.services["analyze"].address,
                        CRM_SYNC_ADDR="ipv4:" + ",".join(c.address for c in crms))
        ingests = [await asyncio.to_thread(mesh.start_service, f"ingest-{r}", {
            "INGEST_WORKER_ID": f"ingest-{r}", "RECORDING_DIR": str(tmp_path / f"recordings-{r}")}, module="ingest")
            for r in "ab"]
        urls = [f"http://{i.address}" for i in ingests]

        call_ids = [f"scale-{i:02d}" for i in range(CALLS)]
        async with aiohttp.ClientSession() as session:
            for i, call_id in enumerate(call_ids):
                payload = {"call_id": call_id, "recording_url": recorder.url_for(RECORDINGS[i % len(RECORDINGS)])}
                acks = await asyncio.gather(*(post_webhook(session, url, payload, mesh.webhook_secret) for url in urls))
                assert [code for code, _ in acks] == [202, 202]
                assert sorted(ack["duplicate"] for _, ack in acks) == [False, True]

            killed = False
            deadline = time.monotonic() + DEADLINE_SECONDS
            current: dict[str, str] = {}
            while time.monotonic() < deadline:
                current = await statuses(session, urls[0])
                seen = Counter(current.values())
                if not killed and seen["done"] >= 6:
                    print(f"SIGKILL ingest-b and crm-b at {dict(seen)}")
                    for name in ("ingest-b", "crm-b"):
                        mesh.services.pop(name).process.kill()
                    killed = True
                if len(current) == CALLS and all(s in ("done", "failed") for s in current.values()):
                    break
                await asyncio.sleep(1.0)
        print(f"final: {dict(Counter(current.values()))}; CRM posts {crm.posts}, records {len(crm.records)}")
        assert killed
        assert current == {call_id: "done" for call_id in call_ids}, current
        assert Counter(r.body["call_id"] for r in crm.records) == {call_id: 1 for call_id in call_ids}
        keys = Counter(r.idempotency_key for r in crm.records)
        assert len(keys) == CALLS and max(keys.values()) == 1
        ingest_a_log = mesh.services["ingest-a"].log_path.read_text()
        assert "PostgreSQL" in ingest_a_log  # the replicas really shared the database
    finally:
        await asyncio.to_thread(mesh.stop)
        await recorder.stop()
        await crm.stop()
