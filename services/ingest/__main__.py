"""``python -m services.ingest``: the webhook, the status API and the pipeline worker, until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from services.common.config import env_str
from services.common.database import schema_check_seconds, watch_schema_version
from services.common.lifecycle import freeze_startup_heap, install_stop_signals, start_site, write_ready_file
from services.common.metrics import start_metrics_site
from services.common.telemetry import run_service
from services.ingest.api import METRICS_REFRESH, create_app, site_options
from services.ingest.config import IngestSettings
from services.ingest.downloader import Downloader, share_not_mounted
from services.ingest.pipeline import PipelineWorker
from services.ingest.signatures import WebhookVerifier
from services.ingest.store import SCHEMA_VERSION, JobStore

SERVICE = "ingest"
log = logging.getLogger(SERVICE)


async def amain() -> None:
    settings = IngestSettings.from_env()
    check_every = schema_check_seconds()
    verifier = WebhookVerifier.from_env()
    if not verifier.enforcing:
        log.warning("WEBHOOK_ALLOW_UNSIGNED=1: webhooks are accepted without a signature; "
                    "anyone who can reach %s:%s can submit calls", settings.host, settings.port)
    else:
        log.info("webhook signatures required (%d active secret(s))", len(verifier.secrets))
    store = JobStore(settings.database_url or settings.database)
    await store.open()
    log.info("job store: %s", "PostgreSQL (DATABASE_URL), shared with the other replicas" if settings.database_url
             else f"SQLite {settings.database}")
    downloader = Downloader(settings.download)
    if not settings.download.allowed_hosts:
        log.warning("RECORDING_ALLOWED_HOSTS is empty: recordings are fetched from any host with a public address")
    for root in settings.download.file_roots:  # in a thread: a share that does not answer holds the call
        if unmounted := await asyncio.to_thread(share_not_mounted, root):
            log.warning("%s: calls that name a file there wait until it is", unmounted)
    if not settings.pipeline.redact_pii:
        log.warning("PII_REDACTION=0: transcripts are stored, shown and analysed with personal data unmasked")
    worker = PipelineWorker(store, downloader, settings.pipeline, settings.pipeline.worker_id)
    app = create_app(store, worker, downloader.policy, verifier, api_token=env_str("API_TOKEN", ""),
                     public_url=settings.public_url, read_timeout=settings.read_timeout,
                     metrics_on_api=not settings.metrics_listen)
    runner, port = await start_site(app, settings.host, settings.port, access_log=None,
                                    shutdown_timeout=settings.grace_seconds, **site_options(settings.read_timeout))
    address = f"{settings.host}:{port}"
    log.info("ingest listening on http://%s (transcribe %s, analyze %s, crm %s)", address,
             settings.pipeline.transcribe_addr, settings.pipeline.analyze_addr, settings.pipeline.crm_addr)
    metrics = f"http://{address}/metrics"
    metrics_runner = None
    if settings.metrics_listen:  # apart from the API, whose port recorders reach
        metrics_runner, metrics_address = await start_metrics_site(settings.metrics_listen, app[METRICS_REFRESH])
        metrics = f"http://{metrics_address}/metrics"
        log.info("ingest metrics on %s", metrics)
    await worker.start()
    stop = asyncio.Event()
    install_stop_signals(stop)
    watcher = asyncio.create_task(watch_schema_version(store.db, SCHEMA_VERSION, stop, check_every))
    freeze_startup_heap()
    write_ready_file(settings.ready_file, address, metrics=metrics)
    await stop.wait()
    newer = await watcher  # done once stop is set
    log.info("ingest stopping: no new webhooks, draining jobs for up to %.0f s", settings.grace_seconds)
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    await worker.stop(settings.grace_seconds)
    await store.close()
    log.info("ingest stopped")
    if newer:
        raise newer


def main() -> None:
    run_service(SERVICE, amain, uvloop=True)  # the webhook's hot path: see run_loop


if __name__ == "__main__":
    main()
