"""``python -m services.crm``: open the outbox, start delivering, serve CrmSyncService until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import time

from opentelemetry.metrics import Observation

from callcenter.v1 import crm_pb2, crm_pb2_grpc
from services.common.database import schema_check_seconds, watch_schema_version
from services.common.grpc_server import ServiceBinding, serve
from services.common.metrics import meter
from services.common.telemetry import run_service
from services.crm.config import CrmSettings
from services.crm.delivery import DeliveryWorker
from services.crm.outbox import SCHEMA_VERSION, Outbox
from services.crm.servicer import CrmSyncServicer

SERVICE = "crm"


async def amain() -> None:
    settings = CrmSettings.from_env()
    check_every = schema_check_seconds()
    outbox = Outbox(settings.database_url or settings.database)
    await outbox.open()
    logging.getLogger(SERVICE).info(
        "outbox: %s", "PostgreSQL (DATABASE_URL), shared with the other replicas" if settings.database_url
        else f"SQLite {settings.database}")
    worker = DeliveryWorker(outbox, settings)
    await worker.start()
    servicer = CrmSyncServicer(outbox, worker, settings.redact_pii)
    if not settings.redact_pii:
        logging.getLogger(SERVICE).warning("PII_REDACTION=0: transcripts reach the CRM with personal data unmasked")
    name = crm_pb2.DESCRIPTOR.services_by_name["CrmSyncService"].full_name
    binding = ServiceBinding(name, lambda s: crm_pb2_grpc.add_CrmSyncServiceServicer_to_server(servicer, s))

    stop = asyncio.Event()  # SIGTERM, or tables a newer Callmesh upgraded
    watcher = asyncio.create_task(watch_schema_version(outbox.db, SCHEMA_VERSION, stop, check_every))

    async def on_stop() -> None:
        await watcher  # done once stop is set; not left looking at a closed outbox
        await worker.stop()
        await outbox.close()

    backlog = {"queued": 0, "oldest": None}
    m = meter(SERVICE)
    m.create_observable_gauge("callmesh.crm.queued", description="Records waiting for the CRM",
                              callbacks=[lambda _: [Observation(backlog["queued"])]])
    m.create_observable_gauge("callmesh.crm.oldest_queued_age", unit="s",
                              description="How long the oldest waiting record has waited",
                              callbacks=[lambda _: [Observation(time.time() - backlog["oldest"] if backlog["oldest"]
                                                                else 0.0)]])

    async def refresh() -> None:
        backlog["queued"], backlog["oldest"] = await outbox.backlog()

    await serve(SERVICE, settings.server, [binding], on_stop=on_stop, metrics_refresh=[refresh], stop=stop)
    if newer := watcher.result():
        raise newer


def main() -> None:
    run_service(SERVICE, amain)


if __name__ == "__main__":
    main()
