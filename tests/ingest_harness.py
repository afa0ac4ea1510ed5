"""A real ingest (webhook, status API, pipeline worker) on 127.0.0.1 port 0, and how tests talk to it.

The gRPC services are pointed at the discard port, so calls stop at transcription
unless a test says otherwise: what happens at the webhook and the download is
seen on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio

from callmesh.standins import Recorder, new_webhook_secret, signed_headers
from services.common.lifecycle import start_site
from services.ingest.api import create_app, site_options
from services.ingest.config import DownloadSettings, PipelineSettings
from services.ingest.downloader import Downloader
from services.ingest.pipeline import PipelineWorker
from services.ingest.signatures import WebhookVerifier
from services.ingest.store import Job, JobOptions, JobStore

UNUSED = "127.0.0.1:9"  # discard port: nothing answers gRPC there
SECRET = new_webhook_secret()
VERIFIER = WebhookVerifier.from_secrets((SECRET,))


class Ingest:
    def __init__(self, url: str, store: JobStore, worker: PipelineWorker) -> None:
        self.url, self.store, self.worker = url, store, worker


@contextlib.asynccontextmanager
async def running_ingest(tmp_path: Path, verifier: WebhookVerifier = VERIFIER, *, max_bytes: int = 1024 * 1024,
                         read_timeout: float = 2, total_timeout: float = 5,
                         allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                         allowed_networks: tuple[str, ...] = ("127.0.0.0/8",),
                         api_token: str = "", database: str | None = None,
                         failed_retention: float = 7 * 24 * 3600.0, min_free_bytes: int = 0,
                         max_dir_bytes: int = 0, not_ready_seconds: float = 0.0, authorization: str = "",
                         authorization_hosts: tuple[str, ...] = (), tls_ca: str = "", file_roots: tuple[str, ...] = (),
                         file_settle_seconds: float = 0.0, http_read_timeout: float = 30.0,
                         **pipeline_settings) -> AsyncIterator[Ingest]:
    """Ingest whose downloads may reach ``allowed_networks`` (the demo's loopback by default);
    ``pipeline_settings`` replace fields of its pipeline settings (addresses, timeouts, …);
    ``database``: a PostgreSQL URL instead of a SQLite file."""
    store = JobStore(database or tmp_path / "ingest.db")
    await store.open()
    download = DownloadSettings(allowed_hosts=allowed_hosts,
                                allowed_networks=tuple(ipaddress.ip_network(n) for n in allowed_networks),
                                max_bytes=max_bytes, connect_timeout=2, read_timeout=read_timeout,
                                total_timeout=total_timeout, max_redirects=3, directory=tmp_path / "recordings",
                                failed_retention=failed_retention, min_free_bytes=min_free_bytes,
                                max_dir_bytes=max_dir_bytes, not_ready_seconds=not_ready_seconds,
                                authorization=authorization, authorization_hosts=authorization_hosts, tls_ca=tls_ca,
                                file_roots=file_roots, file_settle_seconds=file_settle_seconds)
    pipeline = PipelineSettings(UNUSED, UNUSED, UNUSED, worker_id="test-worker", concurrency=2, max_attempts=2,
                                backoff_initial=0.05, backoff_max=0.1, transcribe_timeout=5, analyze_timeout=5,
                                rpc_timeout=2, delivery_poll_seconds=0.1, chunk_bytes=65536, lease_seconds=30)
    pipeline = dataclasses.replace(pipeline, **pipeline_settings)
    downloader = Downloader(download)
    worker = PipelineWorker(store, downloader, pipeline)
    await worker.start()
    app = create_app(store, worker, downloader.policy, verifier, api_token=api_token, read_timeout=http_read_timeout)
    runner, port = await start_site(app, "127.0.0.1", 0, **site_options(http_read_timeout))
    try:
        yield Ingest(f"http://127.0.0.1:{port}", store, worker)
    finally:
        await runner.cleanup()
        await worker.stop(1)
        await store.close()


async def stored_call(tmp_path: Path, call_id: str, state: str, options: JobOptions = JobOptions(),
                      **fields: Any) -> Job:
    """A call (its webhook's ``options``) already at ``state`` (with ``fields``) in the job store the harness opens,
    as if an earlier run had taken it there: ingest resumes it from that stage."""
    store = JobStore(tmp_path / "ingest.db")
    await store.open()
    try:
        await store.create(call_id, "http://127.0.0.1:9/c.wav", options, {}, "0" * 32)
        await store.update(call_id, None, state=state, **fields)
        job = await store.get(call_id)
    finally:
        await store.close()
    assert job is not None
    return job


@pytest_asyncio.fixture
async def ingest(tmp_path: Path) -> AsyncIterator[Ingest]:
    async with running_ingest(tmp_path) as running:
        yield running


@pytest_asyncio.fixture
async def recorder(audio_dir: Path) -> AsyncIterator[Recorder]:
    r = await Recorder(audio_dir).start()
    yield r
    await r.stop()


async def post(url: str, body: bytes | str, content_type: str = "application/json",
               headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST a webhook signed with SECRET, unless ``headers`` are given."""
    data = body.encode() if isinstance(body, str) else body
    sent = {**(signed_headers(SECRET, data) if headers is None else headers), "Content-Type": content_type}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/calls", data=data, headers=sent) as resp:
            return resp.status, await resp.json(content_type=None)


async def wait_for(url: str, call_id: str, done: Callable[[dict], bool], timeout: float = 30) -> dict:
    """The call's status once ``done(status)`` holds; polled every 0.1 s."""
    async with aiohttp.ClientSession() as session:
        for _ in range(int(timeout * 10)):
            async with session.get(f"{url}/v1/calls/{call_id}") as resp:
                status = await resp.json()
            if done(status):
                return status
            await asyncio.sleep(0.1)
    raise AssertionError(f"{call_id} never got there: {status}")


async def wait_for_state(url: str, call_id: str, states: set[str], timeout: float = 30) -> dict:
    return await wait_for(url, call_id, lambda status: status["status"] in states, timeout)
