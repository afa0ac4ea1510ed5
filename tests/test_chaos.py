"""Chaos: 20 calls in flight while each of the four services is SIGKILLed once and restarted.

The mesh runs on the real Whisper weights and the small LLM (the large one only
changes how long it takes). Every webhook is posted three times at once. What
must hold at the end: all 20 calls done, each in the CRM exactly once (one
Idempotency-Key per call, none twice), none stuck. The seed is printed (and can
be set with CHAOS_SEED) so a failing order of kills can be replayed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from callmesh.mesh import new_mesh
from callmesh.standins import CrmReceiver, Recorder, post_webhook

pytestmark = pytest.mark.models
log = logging.getLogger(__name__)

CALLS = 20
RECORDINGS = ("en-internet-angry.wav", "es-billing-angry.wav", "es-billing-angry-8k.mp3", "stereo-agent-left.wav")


async def statuses(session: aiohttp.ClientSession, ingest_url: str) -> dict[str, str]:
    """Every call's state; an ingest that is down (being restarted) answers nothing."""
    try:
        async with session.get(f"{ingest_url}/v1/calls", params={"limit": "500"}) as resp:
            return {c["call_id"]: c["status"] for c in (await resp.json())["calls"]}
    except aiohttp.ClientError:
        return {}


async def test_twenty_calls_survive_each_service_being_killed(audio_dir: Path, whisper_dir: Path, llm_small: Path,
                                                              tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (CHAOS_SEED={seed} replays this order of kills)")
    recorder = await Recorder(audio_dir).start()
    crm = await CrmReceiver().start()
    mesh = new_mesh({
        "CRM_URL": crm.url, "WHISPER_MODEL": str(whisper_dir), "LLM_MODEL": str(llm_small),
        "RECORDING_ALLOWED_HOSTS": "127.0.0.1", "RECORDING_ALLOWED_NETWORKS": "127.0.0.0/8",
        "INGEST_DATABASE": str(tmp_path / "ingest.db"), "CRM_DATABASE": str(tmp_path / "crm.db"),
        "RECORDING_DIR": str(tmp_path / "recordings"), "PIPELINE_CONCURRENCY": "2",
        "PIPELINE_BACKOFF_INITIAL_SECONDS": "0.2", "PIPELINE_BACKOFF_MAX_SECONDS": "2",
        "CRM_BACKOFF_INITIAL_SECONDS": "0.2", "CRM_BACKOFF_MAX_SECONDS": "2", "DELIVERY_POLL_SECONDS": "0.5",
        "TRANSCRIBE_MAX_QUEUED": "2",
    }, tmp_path)
    try:
        await asyncio.to_thread(mesh.start)
        call_ids = [f"chaos-{i:02d}" for i in range(CALLS)]
        async with aiohttp.ClientSession() as session:
            for i, call_id in enumerate(call_ids):
                payload = {"call_id": call_id, "recording_url": recorder.url_for(RECORDINGS[i % len(RECORDINGS)])}
                if RECORDINGS[i % len(RECORDINGS)].startswith("stereo"):
                    payload["agent_channel"] = "left"
                acks = await asyncio.gather(*(post_webhook(session, mesh.ingest_url, payload, mesh.webhook_secret)
                                              for _ in range(3)))
                assert [code for code, _ in acks] == [202, 202, 202]
                assert sorted(ack["duplicate"] for _, ack in acks) == [False, True, True]

            kills = ["transcribe", "analyze", "crm", "ingest"]
            rng.shuffle(kills)
            for name in kills:
                await asyncio.sleep(rng.uniform(1.0, 10.0))
                seen = Counter((await statuses(session, mesh.ingest_url)).values())
                print(f"SIGKILL {name} at {dict(seen)}")
                await asyncio.to_thread(mesh.restart_service, name, kill=True)

            deadline = time.monotonic() + 1500
            while time.monotonic() < deadline:
                current = await statuses(session, mesh.ingest_url)
                if len(current) == CALLS and all(s in ("done", "failed") for s in current.values()):
                    break
                await asyncio.sleep(1.0)
        print(f"final: {dict(Counter(current.values()))}; CRM posts {crm.posts}, records {len(crm.records)}")
        assert current == {call_id: "done" for call_id in call_ids}, current
        delivered = Counter(r.body["call_id"] for r in crm.records)
        assert delivered == {call_id: 1 for call_id in call_ids}
        keys = Counter(r.idempotency_key for r in crm.records)
        assert len(keys) == CALLS and max(keys.values()) == 1
    finally:
        await asyncio.to_thread(mesh.stop)
        await recorder.stop()
        await crm.stop()
