"""``python -m services.crm``: open the outbox, start delivering, serve CrmSyncService until SIGTERM."""

from __future__ import annotations


from callcenter.v1 import crm_pb2, crm_pb2_grpc
from services.common.grpc_server import ServiceBinding, serve
from services.common.telemetry import run_service
from services.crm.config import CrmSettings
from services.crm.delivery import DeliveryWorker
from services.crm.outbox import Outbox
from services.crm.servicer import CrmSyncServicer

SERVICE = "crm"


async def amain() -> None:
    settings = CrmSettings.from_env()
    outbox = Outbox(settings.database)
    await outbox.open()
    worker = DeliveryWorker(outbox, settings)
    await worker.start()
    servicer = CrmSyncServicer(outbox, worker)
    name = crm_pb2.DESCRIPTOR.services_by_name["CrmSyncService"].full_name
    binding = ServiceBinding(name, lambda s: crm_pb2_grpc.add_CrmSyncServiceServicer_to_server(servicer, s))

    async def on_stop() -> None:
        await worker.stop()
        await outbox.close()

    await serve(SERVICE, settings.server, [binding], on_stop=on_stop)


def main() -> None:
    run_service(SERVICE, amain)


if __name__ == "__main__":
    main()
