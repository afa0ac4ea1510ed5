"""A crm service on 127.0.0.1 port 0 with its outbox, delivering to the stand-in CRM: for the tests of
the crm service and of what reaches it from ingest."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest_asyncio

from callcenter.v1 import common_pb2, crm_pb2, crm_pb2_grpc
from callmesh.standins import CrmReceiver
from services.common.config import GrpcServerSettings
from services.common.grpc_server import RunningServer, ServiceBinding, client_channel, start_server
from services.common.protoconv import timestamp
from services.crm.config import CrmSettings
from services.crm.delivery import DeliveryWorker
from services.crm.outbox import Outbox
from services.crm.servicer import CrmSyncServicer
from services.ingest.store import DELIVERING
from tests.ingest_harness import Ingest, running_ingest, stored_call, wait_for


@dataclass
class Crm:
    stub: crm_pb2_grpc.CrmSyncServiceStub
    receiver: CrmReceiver
    server: RunningServer
    worker: DeliveryWorker
    outbox: Outbox
    channel: grpc.aio.Channel

    async def close(self) -> None:
        await self.channel.close()
        await self.server.stop(1)
        await self.worker.stop()
        await self.outbox.close()


async def start_crm(db: Path | str, receiver: CrmReceiver, lease_seconds: float = 30.0, redact_pii: bool = True,
                    delivered_retention: float = CrmSettings.delivered_retention, tls_ca: str = "",
                    crm_token: str = "", crm_headers: tuple[tuple[str, str], ...] = (), signing_secret: str = "") -> Crm:
    """A CRM sync service on port 0; ``db`` is a SQLite file or a PostgreSQL URL."""
    settings = CrmSettings(server=GrpcServerSettings("127.0.0.1:0", 1, None), crm_url=receiver.url, crm_token=crm_token,
                           database=Path("unused.db"), database_url=db if isinstance(db, str) else "",
                           timeout_seconds=2, backoff_initial=0.05, backoff_max=0.2, batch=4,
                           lease_seconds=lease_seconds, delivered_retention=delivered_retention, tls_ca=tls_ca,
                           crm_headers=crm_headers, signing_secret=signing_secret)
    outbox = Outbox(db)
    await outbox.open()
    worker = DeliveryWorker(outbox, settings)
    await worker.start()
    servicer = CrmSyncServicer(outbox, worker, redact_pii)
    server = await start_server("127.0.0.1:0", [ServiceBinding(
        "callcenter.v1.CrmSyncService", lambda s: crm_pb2_grpc.add_CrmSyncServiceServicer_to_server(servicer, s))])
    channel = client_channel(server.address)
    return Crm(crm_pb2_grpc.CrmSyncServiceStub(channel), receiver, server, worker, outbox, channel)


@contextlib.asynccontextmanager
async def crm_service(db: Path | str, receiver: CrmReceiver, **options) -> AsyncIterator[Crm]:
    """:func:`start_crm` (``options``: its own), closed at the end."""
    crm = await start_crm(db, receiver, **options)
    try:
        yield crm
    finally:
        await crm.close()


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[CrmReceiver]:
    r = await CrmReceiver().start()
    yield r
    await r.stop()


@contextlib.asynccontextmanager
async def crm_posting(tmp_path: Path, receiver: CrmReceiver, call_id: str) -> AsyncIterator[Crm]:
    """A crm service whose record of ``call_id`` is being POSTed: the CRM holds its answer until
    ``receiver.hold`` is set (at the latest when the block ends)."""
    receiver.hold = asyncio.Event()
    crm = await start_crm(tmp_path / "o.db", receiver)
    try:
        await crm.stub.Deliver(crm_pb2.DeliverRequest(record=record(call_id)))
        for _ in range(100):
            if receiver.posts:
                break
            await asyncio.sleep(0.02)
        yield crm
    finally:
        receiver.hold.set()
        await crm.close()


def record(call_id: str) -> crm_pb2.CallRecord:
    return crm_pb2.CallRecord(call_id=call_id, language_code="es", transcript="Hola.", translated_transcript="Hello.",
                              summary=["a", "b", "c"], topic="Billing", sentiment=common_pb2.SENTIMENT_NEGATIVE,
                              emotion="angry", create_time=timestamp(1_790_000_000.0))


async def wait_delivery(stub, call_id: str, done: Callable[[crm_pb2.Delivery], bool],
                        timeout: float = 20) -> crm_pb2.Delivery:
    for _ in range(int(timeout * 20)):
        d = (await stub.GetDelivery(crm_pb2.GetDeliveryRequest(call_id=call_id))).delivery
        if done(d):
            return d
        await asyncio.sleep(0.05)
    raise AssertionError(f"{call_id} never got there: {d}")


async def wait_state(stub, call_id: str, state: int, timeout: float = 20) -> crm_pb2.Delivery:
    return await wait_delivery(stub, call_id, lambda d: d.state == state, timeout)


async def analysed_call(tmp_path: Path, call_id: str) -> None:
    """A call transcribed and analysed before ingest starts: it resumes at delivery."""
    await stored_call(tmp_path, call_id, DELIVERING, transcript={"language": "es", "segments": [
        {"index": 0, "start": 0.0, "end": 1.0, "text": "Hola.", "speaker": "unknown"}]},
        analysis={"summary": ["a", "b", "c"], "topic": "Billing", "sentiment": "negative", "emotion": "angry"})


@contextlib.asynccontextmanager
async def call_held_up_at_the_crm(tmp_path: Path, receiver: CrmReceiver,
                                  call_id: str = "c-stuck") -> AsyncIterator[tuple[Crm, Ingest]]:
    """Ingest and the crm service, with an analysed call whose record the CRM answers 500 to (and only that
    one), once the CRM has been tried twice with it."""
    await analysed_call(tmp_path, call_id)
    receiver.fail_for = {call_id: 500}
    async with crm_service(tmp_path / "o.db", receiver) as crm:
        async with running_ingest(tmp_path, crm_addr=crm.server.address) as ingest:
            await wait_for(ingest.url, call_id, lambda s: (s.get("delivery") or {}).get("attempts", 0) >= 2, 15)
            yield crm, ingest
