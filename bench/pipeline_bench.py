"""The whole mesh: does decoding overlap the other stages, and what the seed's synchronous design costs.

Both use the same models (Whisper base and, by default, the small LLM to keep the
run short; ``--llm main`` uses the default 1.5B). Calls are the espeak-ng samples
served by the stand-in recorder on loopback; records go to the stand-in CRM.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from bench.common import Result, interleaved, ratio_result, span, value_result
from callmesh.mesh import Mesh, new_mesh
from callmesh.samples import SAMPLES, synthesize
from callmesh.standins import CrmReceiver, Recorder, post_webhook

RECORDINGS = ("en-internet-angry.wav", "es-billing-angry.wav")


def make_recordings(directory: Path, made: Path | None = None) -> None:
    """The calls the recorder serves: synthesized, or copied from ``made`` (``python -m bench --make-recordings``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in RECORDINGS:
        key = name.removesuffix(".wav")
        if (directory / name).exists():
            continue
        if made is not None:
            shutil.copyfile(made / name, directory / name)
        else:
            synthesize(SAMPLES[key].text, SAMPLES[key].voice, directory / name)


async def wait_delivered(crm: CrmReceiver, call_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(crm.for_call(c) for c in call_ids):
        if time.monotonic() > deadline:
            missing = [c for c in call_ids if not crm.for_call(c)]
            raise TimeoutError(f"{len(missing)} call(s) never reached the CRM: {missing[:5]}")
        await asyncio.sleep(0.2)


class World:
    def __init__(self, work: Path, whisper: Path, llm: Path, concurrency: int, recordings: Path | None = None) -> None:
        self.work, self.whisper, self.llm, self.concurrency = work, whisper, llm, concurrency
        self.recordings = recordings
        self.counter = 0

    async def __aenter__(self) -> "World":
        make_recordings(self.work / "recordings", self.recordings)
        self.recorder = await Recorder(self.work / "recordings").start()
        self.crm = await CrmReceiver().start()
        self.mesh: Mesh = new_mesh({
            "CRM_URL": self.crm.url, "WHISPER_MODEL": str(self.whisper), "LLM_MODEL": str(self.llm),
            "RECORDING_ALLOWED_HOSTS": "127.0.0.1", "RECORDING_ALLOWED_NETWORKS": "127.0.0.0/8",
            "CALLMESH_DATA_DIR": str(self.work / "data"), "LOG_LEVEL": "WARNING",
            "PIPELINE_CONCURRENCY": str(self.concurrency), "DELIVERY_POLL_SECONDS": "0.5",
            "TRANSCRIBE_LISTEN": "127.0.0.1:0", "ANALYZE_LISTEN": "127.0.0.1:0", "CRM_SYNC_LISTEN": "127.0.0.1:0",
            "INGEST_PORT": "0", "ANALYZE_MAX_QUEUED": "64", "TRANSCRIBE_MAX_QUEUED": "64",
        }, self.work / "mesh")
        self.mesh.workdir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.mesh.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.mesh.stop)
        await self.recorder.stop()
        await self.crm.stop()

    def new_ids(self, n: int, prefix: str) -> list[str]:
        self.counter += 1
        return [f"{prefix}{self.counter}-{i:02d}" for i in range(n)]

    async def mesh_batch(self, call_ids: list[str]) -> tuple[float, list[float]]:
        """Post every webhook at once; (seconds until all are in the CRM, webhook latencies)."""
        latencies: list[float] = []
        start = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            async def one(i: int, call_id: str) -> None:
                t0 = time.perf_counter()
                payload = {"call_id": call_id, "recording_url": self.recorder.url_for(RECORDINGS[i % 2])}
                code, body = await post_webhook(session, self.mesh.ingest_url, payload, self.mesh.webhook_secret)
                latencies.append(time.perf_counter() - t0)
                if code != 202:
                    raise RuntimeError(f"HTTP {code}: {body}")

            await asyncio.gather(*(one(i, c) for i, c in enumerate(call_ids)))
        await wait_delivered(self.crm, call_ids, 3600)
        return time.perf_counter() - start, latencies

    def decode_busy_fraction(self, call_ids: list[str]) -> tuple[float, float]:
        """Σ decode time / (last decode end − first decode start), from the transcriber's own timing
        (processing_time of each call) and when ingest saw each transcription end; and that span."""
        db = sqlite3.connect(self.work / "data" / "ingest.db")
        spans = []
        for call_id in call_ids:
            transcript, stages = db.execute("SELECT transcript, stage_times FROM jobs WHERE call_id = ?",
                                            (call_id,)).fetchone()
            decode = json.loads(transcript)["processing_time"]
            end = json.loads(stages)["analyzing"]
            spans.append((end - decode, end))
        db.close()
        window = max(e for _, e in spans) - min(s for s, _ in spans)
        return sum(e - s for s, e in spans) / window, window


async def pipeline_overlap(work: Path, whisper: Path, llm: Path, runs: int, calls: int = 20,
                           concurrency: int = 2, recordings: Path | None = None) -> list[Result]:
    async with World(work / f"overlap-{concurrency}", whisper, llm, concurrency, recordings) as world:
        fractions, totals, spans = [], [], []
        for _ in range(runs):
            ids = world.new_ids(calls, "overlap")
            total, _ = await world.mesh_batch(ids)
            totals.append(total)
            fraction, window = world.decode_busy_fraction(ids)
            fractions.append(fraction)
            spans.append(window)
    return [value_result(f"decode busy, {calls} calls, concurrency {concurrency}", fractions, "fraction",
                         ">= 0.90", lambda v: v >= 0.90,
                         f"all {calls} in the CRM after {span(totals, 0)} s; "
                         f"all {calls} decoded within {span(spans, 0)} s")]


async def seed_versus_mesh(work: Path, whisper: Path, llm: Path, runs: int, calls: int = 10,
                           recordings: Path | None = None) -> list[Result]:
    async with World(work / "seed", whisper, llm, 2, recordings) as world:
        ready = work / "seed.ready"
        seed = subprocess.Popen([sys.executable, "-m", "bench.seed_baseline", "--ready", str(ready),
                                 "--crm", world.crm.url], env={**world.mesh.env, "LLM_MODEL": str(llm),
                                                               "WHISPER_MODEL": str(whisper)})
        try:
            while not ready.exists():
                if seed.poll() is not None:
                    raise RuntimeError("the seed baseline did not start")
                await asyncio.sleep(0.1)
            seed_url = "http://" + json.loads(ready.read_text())["address"]
            seed_lat: list[list[float]] = []
            mesh_lat: list[list[float]] = []

            async def seed_batch() -> float:
                ids = world.new_ids(calls, "seed")
                latencies: list[float] = []
                start = time.perf_counter()
                timeout = aiohttp.ClientTimeout(total=3600)
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    async def one(i: int, call_id: str) -> None:
                        t0 = time.perf_counter()
                        payload = {"call_id": call_id, "recording_url": world.recorder.url_for(RECORDINGS[i % 2])}
                        async with session.post(f"{seed_url}/webhook", json=payload) as resp:
                            assert resp.status == 200, await resp.text()
                        latencies.append(time.perf_counter() - t0)

                    await asyncio.gather(*(one(i, c) for i, c in enumerate(ids)))
                seed_lat.append(latencies)
                return time.perf_counter() - start

            async def mesh_batch() -> float:
                total, latencies = await world.mesh_batch(world.new_ids(calls, "mesh"))
                mesh_lat.append(latencies)
                return total

            seed_totals, mesh_totals = await interleaved(seed_batch, mesh_batch, runs)
        finally:
            seed.terminate()
            seed.wait()
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    seed_ack = [median(x) for x in seed_lat]
    mesh_ack = [median(x) * 1000 for x in mesh_lat]
    return [
        ratio_result(f"mesh vs seed, total for {calls} calls", [m / s for m, s in zip(mesh_totals, seed_totals)],
                     "<= 1.0", lambda v: v <= 1.0,
                     f"mesh {span(mesh_totals, 0)} s, seed "
                     f"{span(seed_totals, 0)} s (all {calls} posted at once)"),
        value_result("seed webhook latency (median)", seed_ack, "s", "(baseline)", None,
                     "the recorder waits for download, transcription, analysis and the CRM"),
        value_result("mesh webhook latency (median)", mesh_ack, "ms", "(ack after durable write)", None),
    ]
